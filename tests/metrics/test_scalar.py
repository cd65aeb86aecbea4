import math

import pytest
import torch
from torchmetrics import MetricCollection

from segcal.metrics import (
    AdaptiveCalibrationError,
    BrierScore,
    CalibrationMetrics,
    ClasswiseCalibrationError,
    DetectionMetrics,
    ExpectedCalibrationError,
    MaximumCalibrationError,
    NegativeLogLikelihood,
    OverconfidenceError,
)

SCALARS = {
    "ece": ExpectedCalibrationError, "mce": MaximumCalibrationError, "ace": AdaptiveCalibrationError,
    "cw_ece": ClasswiseCalibrationError, "nll": NegativeLogLikelihood, "brier": BrierScore,
    "oe": OverconfidenceError,
}


def _batches(c: int = 4, n_batches: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        logits = torch.randn(2, c, 9, 7, generator=g) * 3
        target = torch.randint(0, c, (2, 9, 7), generator=g)
        target[:, 0, :3] = 255
        out.append((logits, target))
    return out


@pytest.mark.parametrize("key", sorted(SCALARS))
def test_scalar_equals_calibration_metrics_key_exactly(key):
    ref = CalibrationMetrics(num_classes=4, n_bins=10, ignore_index=255)
    m = SCALARS[key](num_classes=4, n_bins=10, ignore_index=255)
    for logits, target in _batches():
        ref.update(logits, target)
        m.update(logits, target)
    value = m.compute()
    assert isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype == torch.float64
    assert torch.equal(value, ref.compute()[key])


def test_collection_shares_one_pass_and_equals_calibration_metrics():
    kw = dict(num_classes=4, n_bins=12, ignore_index=255)
    coll = MetricCollection({k: cls(**kw) for k, cls in SCALARS.items()})
    ref = CalibrationMetrics(**kw)
    calls = []
    for logits, target in _batches():
        coll.update(logits, target)
        ref.update(logits, target)
        if not calls:  # after the first batch the groups are formed; count updates from now on
            for name, metric in coll.items(keep_base=True, copy_state=False):
                orig = metric.update
                metric.update = lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1]
    assert len(coll.compute_groups) == 1, coll.compute_groups
    assert len(calls) == 2  # batches 2 and 3: one update each for the whole collection
    out, expected = coll.compute(), ref.compute()
    for key in SCALARS:
        assert torch.equal(out[key], expected[key]), key


def test_different_settings_do_not_share_a_group():
    # same state shapes, different ignore_index: must not be merged even if the first batch has no 0 label
    logits, target = _batches(n_batches=1)[0]
    target = torch.where((target == 0) | (target == 255), 1, target)
    coll = MetricCollection({"a": ExpectedCalibrationError(4, ignore_index=255),
                             "b": ExpectedCalibrationError(4, ignore_index=0)})
    coll.update(logits, target)
    assert len(coll.compute_groups) == 2


def test_metadata():
    for cls in SCALARS.values():
        assert cls.higher_is_better is False
        assert cls.full_state_update is False
        assert cls.is_differentiable is False
    assert CalibrationMetrics.higher_is_better is None  # holds errors and accuracy / mIoU
    assert DetectionMetrics.higher_is_better is None  # holds AUROC / AP and FPR95


def test_validate_args_false_is_a_fast_path_with_equal_results():
    checked, fast = ExpectedCalibrationError(4), ExpectedCalibrationError(4, validate_args=False)
    for logits, target in _batches():
        checked.update(logits, target)
        fast.update(logits, target)
    assert torch.equal(checked.compute(), fast.compute())
    with pytest.raises(ValueError, match="target"):
        checked.update(torch.randn(1, 4, 3, 3), torch.full((1, 3, 3), 7))


def test_classwise_metric_refuses_classwise_false():
    with pytest.raises(ValueError, match="classwise"):
        ClasswiseCalibrationError(4, classwise=False)


def test_forward_returns_batch_value_and_accumulates():
    m = ExpectedCalibrationError(4)
    (l1, t1), (l2, t2) = _batches(n_batches=2)
    batch_value = m(l1, t1)
    assert torch.equal(batch_value, _value(l1, t1))
    m(l2, t2)
    assert torch.equal(m.compute(), _value(torch.cat([l1, l2]), torch.cat([t1, t2])))


def _value(logits, target):
    m = ExpectedCalibrationError(4)
    m.update(logits, target)
    return m.compute()


def test_empty_gives_nan_not_error():
    m = NegativeLogLikelihood(3)
    m.update(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 255))
    assert math.isnan(float(m.compute()))


def test_plot_returns_fig_and_ax():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    m = ExpectedCalibrationError(4)
    values = []
    for logits, target in _batches():
        values.append(m(logits, target))
    fig, ax = m.plot()
    assert fig is ax.figure
    _, ax2 = m.plot(values)
    assert len(ax2.get_lines()) >= 1
    matplotlib.pyplot.close("all")


def test_detection_scalars_equal_detection_metrics_and_share_a_group():
    from segcal.metrics import DetectionAUROC, DetectionAveragePrecision, DetectionFPR95

    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(2, 6, 6, generator=g), torch.rand(2, 6, 6, generator=g) > 0.6) for _ in range(3)]
    ref = DetectionMetrics()
    coll = MetricCollection({"auroc": DetectionAUROC(), "ap": DetectionAveragePrecision(), "fpr95": DetectionFPR95()})
    for s, p in batches:
        ref.update(s + p.float(), p)
        coll.update(s + p.float(), p)
    assert len(coll.compute_groups) == 1
    out, expected = coll.compute(), ref.compute()
    for key in ("auroc", "ap", "fpr95"):
        assert torch.equal(out[key], expected[key]), key
    assert DetectionAUROC.higher_is_better and DetectionAveragePrecision.higher_is_better
    assert DetectionFPR95.higher_is_better is False


def test_collection_on_device_equals_cpu(device):
    kw = dict(num_classes=4, n_bins=12)
    coll = MetricCollection({k: cls(**kw) for k, cls in SCALARS.items()}).to(device)
    ref = CalibrationMetrics(**kw)
    for logits, target in _batches():
        coll.update(logits.to(device), target.to(device))
        ref.update(logits, target)
    out, expected = coll.compute(), ref.compute()
    for key in SCALARS:
        assert out[key].device.type == torch.device(device).type
        assert float(out[key]) == pytest.approx(float(expected[key]), abs=1e-9), key
