"""Issue 12 item 4: fixed-point states never overflow silently (exact, or a clear OverflowError)."""

import pytest
import torch

from segcal.metrics import CalibrationMetrics, DetectionMetrics
from segcal.metrics import functional as F
from segcal.metrics._binning import FIXED_LIMIT, from_fixed2, to_fixed2
from segcal.metrics.calibration import _FIXED_STATES


def _nll64(logits, target):
    return float(-torch.log_softmax(logits.double(), 1).gather(1, target.unsqueeze(1)).mean())


def test_huge_logits_give_the_exact_positive_nll():
    """The issue's example: randn(2,5,8,8) * 1e10 printed nll -4.29e9."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, generator=g) * 1e10
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    ref = _nll64(logits, target)
    assert ref > 1e9
    m = CalibrationMetrics(5)
    m.update(logits, target)
    m.update(logits, target)
    assert float(m.compute()["nll"]) == pytest.approx(ref, rel=1e-6)
    assert float(F.nll(logits, target)) == pytest.approx(ref, rel=1e-6)


def test_float16_confident_wrong_logits():
    """`segcal evaluate` on a float16 store of very confident wrong logits printed nll -89715 (true 120000)."""
    logits = torch.zeros(4, 3, 64, 64, dtype=torch.float16)
    logits[:, 0] = 60000.0
    logits[:, 1] = -60000.0
    target = torch.full((4, 64, 64), 1)
    m = CalibrationMetrics(3)
    for _ in range(3):
        m.update(logits, target)
    assert float(m.compute()["nll"]) == pytest.approx(120000.0, rel=1e-6)


def test_near_capacity_is_exact_and_beyond_raises():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    logits[:, 1] = 1e15  # -log p_y = 1e15 per pixel, 1.6e16 in all: below the 2**54 capacity
    assert float(F.nll(logits, target)) == pytest.approx(1e15, rel=1e-12)
    logits[:, 1] = 1e17  # one batch beyond the capacity
    with pytest.raises(OverflowError, match="nll_sum"):
        F.nll(logits, target)
    m = CalibrationMetrics(2)
    with pytest.raises(OverflowError, match="nll_sum"):
        m.update(logits, target)
    assert int(m.nll_sum.abs().sum()) == 0  # nothing was committed


@pytest.mark.parametrize("name", _FIXED_STATES)
def test_every_fixed_point_state_refuses_to_wrap(name):
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 4, (2, 8, 8), generator=g)
    m = CalibrationMetrics(4)
    m.update(logits, target)
    state = getattr(m, name)
    near = torch.where(state != 0, torch.full_like(state, FIXED_LIMIT - 1), state)
    if name == "image_ece_sum":
        near = torch.full_like(state, FIXED_LIMIT - 1)
    elif near.ndim and near.shape[-1] == 2:
        near[..., 1] = 0  # low words stay small; the high word is at the edge
    setattr(m, name, near)
    before = {k: getattr(m, k).clone() for k in _FIXED_STATES}
    with pytest.raises(OverflowError, match=name):
        m.update(logits, target)
    for k in _FIXED_STATES:
        assert torch.equal(getattr(m, k), before[k])
    with pytest.raises(OverflowError, match=name):  # and compute never reports a number from a broken state
        setattr(m, name, torch.full_like(state, FIXED_LIMIT))
        m.compute()


def test_two_word_format_round_trip_and_markers():
    x = torch.tensor([0.0, 0.1, 1.5, 123456789.123, 2.0**53])
    assert torch.allclose(from_fixed2(to_fixed2(x)), x.double(), rtol=0, atol=2.0**-40)
    bad = to_fixed2(torch.tensor([float("nan"), float("inf"), 1e17], dtype=torch.float64))
    assert torch.all(bad[:, 0] == FIXED_LIMIT)


def test_detection_per_image_sums_refuse_to_wrap():
    m = DetectionMetrics(per_image=True)
    s = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2))
    m.update(s, s > 0.5)
    m.img_sums = torch.full_like(m.img_sums, FIXED_LIMIT - 1)
    with pytest.raises(OverflowError, match="img_sums"):
        m.update(s, s > 0.5)


def test_per_image_sums_do_not_depend_on_the_batching():
    """Per-image values are rounded to the grid one image at a time (torchrun evaluate batches differently)."""
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(4, 3, 8, 8, generator=g) * 3, torch.randint(0, 3, (4, 8, 8), generator=g)
    scores = torch.rand(4, 8, 8, generator=g)
    whole, split = CalibrationMetrics(3), CalibrationMetrics(3)
    dwhole, dsplit = DetectionMetrics(per_image=True), DetectionMetrics(per_image=True)
    whole.update(logits, target)
    dwhole.update(scores, logits.argmax(1) != target)
    for i in range(4):
        split.update(logits[i:i + 1], target[i:i + 1])
        dsplit.update(scores[i:i + 1], logits[i:i + 1].argmax(1) != target[i:i + 1])
    assert torch.equal(whole.image_ece_sum, split.image_ece_sum)
    assert torch.equal(dwhole.img_sums, dsplit.img_sums)
