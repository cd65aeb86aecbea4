import pytest
import torch

from segcal.metrics import CalibrationMetrics
from segcal.metrics import functional as F


def _ok(n=1, c=3, h=4, w=4):
    return torch.randn(n, c, h, w), torch.randint(0, c, (n, h, w))


@pytest.mark.parametrize(("preds", "target", "exc", "msg"), [
    (torch.tensor([[[[float("nan")]], [[0.0]], [[0.0]]]]), torch.zeros(1, 1, 1, dtype=torch.long), ValueError, "NaN"),
    (torch.tensor([[[[float("inf")]], [[0.0]], [[0.0]]]]), torch.zeros(1, 1, 1, dtype=torch.long), ValueError, "inf"),
    (torch.randn(3, 4, 4), torch.randint(0, 3, (3, 4, 4)), ValueError, r"\(N, C, H, W\)"),
    (torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 1, 4, 4)), ValueError, r"\(N, H, W\)"),
    (torch.randn(1, 4, 4, 4), torch.randint(0, 3, (1, 4, 4)), ValueError, "C=4"),
    (torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 3), ValueError, "labels outside"),
    (torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), -1), ValueError, "labels outside"),
    (torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long), ValueError, "shape"),
    (torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4), TypeError, "integer"),
    (torch.randint(0, 3, (1, 3, 4, 4)), torch.zeros(1, 4, 4, dtype=torch.long), TypeError, "floating"),
    ("not a tensor", torch.zeros(1, 4, 4, dtype=torch.long), TypeError, "torch.Tensor"),
])
def test_bad_batch_raises_naming_the_problem(preds, target, exc, msg):
    with pytest.raises(exc, match=msg):
        CalibrationMetrics(3).update(preds, target)


def test_bad_probs():
    p = torch.softmax(torch.randn(1, 3, 2, 2), 1)
    y = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="sum to 1"):
        F.ece(p * 0.5, y, input="probs")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.ece(p * 2 - 0.5, y, input="probs")


@pytest.mark.parametrize("kwargs", [
    {"num_classes": 1}, {"num_classes": 3, "n_bins": 0}, {"num_classes": 3, "input": "softmax"},
    {"num_classes": 3, "exclude_classes": [3]}, {"num_classes": 3, "exclude_classes": [0, 1, 2]},
    {"num_classes": 3, "boundary_width": 0}, {"num_classes": 3, "ace_resolution": 4},
])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)) if len(kwargs) == 1 else list(kwargs)[1]):
        CalibrationMetrics(**kwargs)


def test_reliability_region_requires_boundary():
    m = CalibrationMetrics(3)
    with pytest.raises(ValueError, match="region"):
        m.reliability("boundary")


def test_all_ignored_batch_is_allowed():
    m = CalibrationMetrics(3)
    preds, _ = _ok()
    m.update(preds, torch.full((1, 4, 4), 255))
    assert int(m.bin_count.sum()) == 0 and int(m.image_count) == 0


def test_ignore_index_none_uses_every_pixel():
    preds, target = _ok()
    out = F.calibration_metrics(preds, target, ignore_index=None)
    assert float(out["n_pixels"]) == 16


@pytest.mark.parametrize("shape", [(0, 5, 8, 8), (1, 5, 0, 8), (2, 5, 8, 0)])
def test_empty_batches_are_one_line_value_errors(shape):
    from segcal.metrics import CalibrationMetrics

    with pytest.raises(ValueError, match="empty"):
        CalibrationMetrics(5).update(torch.zeros(shape), torch.zeros(shape[0], *shape[2:], dtype=torch.long))


def test_absurd_bin_count_is_refused_before_allocating():
    from segcal.metrics import CalibrationMetrics

    with pytest.raises(ValueError, match="at most"):
        CalibrationMetrics(5, n_bins=1_000_000_000)
