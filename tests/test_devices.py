"""Every public class on every device the suite can reach (issue 12 item 14).

``device`` (tests/conftest.py) is ``cpu`` always and ``cuda`` when available. On each device a class must run on
tensors placed there, return results on that device, and agree with the default path (CPU tensors, no ``.to``):
bit for bit on the CPU, within float tolerance on CUDA (other kernels, other summation order; integer metric
states whose bins a rounding can move are compared through the metric values). The ``meta`` device (shapes
without data) is used where it is meaningful: the sync-free detection steps run on it, which proves they create no
tensor on a hard-coded device; the metric entry points refuse it with a one-line error. (Losses, calibrators and
detectors validate their inputs by reading values, so meta is not meaningful for them.)
"""

from __future__ import annotations

import pytest
import torch

from segcal.calibrators import CALIBRATORS, get_calibrator
from segcal.detectors import DETECTORS, get_detector
from segcal.losses import LOSSES, get_loss
from segcal.metrics import (
    AdaptiveCalibrationError,
    BrierScore,
    CalibrationMetrics,
    ClasswiseCalibrationError,
    DetectionAUROC,
    DetectionAveragePrecision,
    DetectionFPR95,
    DetectionMetrics,
    ExpectedCalibrationError,
    MaximumCalibrationError,
    NegativeLogLikelihood,
    OverconfidenceError,
)
from segcal.metrics.detection import _error_bounds, _hist2, _rank_metrics, _score_key

C, H, W = 4, 12, 12
# The calibrators run with a few iterations on purpose (speed); their not-converged warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::segcal.calibrators.ConvergenceWarning")


def _data(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, H, W, generator=g) * 3
    p = torch.softmax(z / 2.0, 1).permute(0, 2, 3, 1).reshape(-1, C)
    y = torch.multinomial(p, 1, generator=g).view(n, H, W)
    y[:, 0, :] = 255
    return z, y, torch.rand(n, 3, H, W, generator=g), torch.randn(n, 8, H // 2, W // 2, generator=g)


def _close(a: torch.Tensor, b: torch.Tensor, device: torch.device, tol: float = 1e-4) -> None:
    """Bit-equal on the CPU, float tolerance elsewhere; ``a`` must live on ``device``."""
    assert a.device.type == device.type
    exact = device.type == "cpu"
    torch.testing.assert_close(a.cpu(), b, rtol=0 if exact else tol, atol=0 if exact else tol, equal_nan=True)


# --- metrics -------------------------------------------------------------------------------------------------------

SCALAR = [ExpectedCalibrationError, MaximumCalibrationError, AdaptiveCalibrationError, ClasswiseCalibrationError,
          NegativeLogLikelihood, BrierScore, OverconfidenceError]


@pytest.mark.parametrize("kwargs", [{}, {"boundary_width": 1, "exclude_classes": [0]}, {"input": "probs"}])
def test_calibration_metrics(device, kwargs):
    z, y, _, _ = _data()
    preds = torch.softmax(z, 1) if kwargs.get("input") == "probs" else z
    ref = CalibrationMetrics(C, **kwargs)
    m = CalibrationMetrics(C, **kwargs).to(device)
    for i in range(0, 4, 2):
        ref.update(preds[i:i + 2], y[i:i + 2])
        m.update(preds[i:i + 2].to(device), y[i:i + 2].to(device))
    assert all(getattr(m, k).device.type == device.type for k in ("bin_count", "nll_sum", "confmat"))
    got, want = m.compute(), ref.compute()
    for k in want:
        _close(got[k], want[k], device)
    if device.type == "cpu":
        for k in ("bin_count", "bin_conf", "fine_conf", "cw_conf", "nll_sum", "brier_sum", "confmat"):
            assert torch.equal(getattr(m, k), getattr(ref, k)), k
    else:  # counts that no rounding can move
        assert torch.equal(m.confmat.cpu(), ref.confmat)
    rel = m.reliability()
    _close(rel["count"], ref.reliability()["count"], device)


@pytest.mark.parametrize("cls", SCALAR, ids=lambda c: c.__name__)
def test_scalar_metrics(device, cls):
    z, y, _, _ = _data(1)
    ref, m = cls(num_classes=C), cls(num_classes=C).to(device)
    ref.update(z, y)
    m.update(z.to(device), y.to(device))
    _close(m.compute(), ref.compute(), device)


@pytest.mark.parametrize("kwargs", [{}, {"per_image": True}, {"exact": True}, {"score_range": (0.0, 1.0)}])
def test_detection_metrics(device, kwargs):
    z, y, _, _ = _data(2)
    scores = 1.0 - torch.softmax(z, 1).amax(1)
    positive, valid = z.argmax(1) != y, y != 255
    ref, m = DetectionMetrics(**kwargs), DetectionMetrics(**kwargs).to(device)
    ref.update(scores, positive, valid)
    m.update(scores.to(device), positive.to(device), valid.to(device))
    got, want = m.compute(), ref.compute()
    assert set(got) == set(want)
    for k in want:
        _close(got[k], want[k], device, tol=1e-6)
    if not kwargs.get("exact"):  # the same float32 scores -> the same bins on any device
        assert torch.equal(m.hist_pos.cpu(), ref.hist_pos) and torch.equal(m.hist_neg.cpu(), ref.hist_neg)
    curves = m.curves()
    assert curves["fpr"].device.type == device.type


@pytest.mark.parametrize("cls", [DetectionAUROC, DetectionAveragePrecision, DetectionFPR95], ids=lambda c: c.__name__)
def test_scalar_detection_metrics(device, cls):
    z, y, _, _ = _data(6)
    scores, positive = 1.0 - torch.softmax(z, 1).amax(1), z.argmax(1) != y
    ref, m = cls(), cls().to(device)
    ref.update(scores, positive)
    m.update(scores.to(device), positive.to(device))
    _close(m.compute(), ref.compute(), device, tol=1e-6)


def test_detection_steps_run_on_the_meta_device():
    """Binning, rank metrics and bounds create every tensor on their input's device and never read values."""
    s = torch.empty(2, 5, 5, device="meta")
    pos = torch.empty(2, 5, 5, dtype=torch.bool, device="meta")
    key = _score_key(s, 2**10, None)
    h = _hist2(key, pos, pos, 2**10)
    assert h.is_meta and h.shape == (2, 2**10, 2)
    out = {**_rank_metrics(h[..., 1], h[..., 0]), **_error_bounds(h[..., 1].sum(0), h[..., 0].sum(0))}
    assert all(v.is_meta for v in out.values())


def test_metrics_refuse_meta_tensors_with_a_clear_error():
    z = torch.empty(1, C, 4, 4, device="meta")
    y = torch.zeros(1, 4, 4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="meta"):
        CalibrationMetrics(C).update(z, y)
    with pytest.raises(ValueError, match="meta"):
        DetectionMetrics().update(z[:, 0], y.bool())


# --- calibrators -----------------------------------------------------------------------------------------------------

FAST_CAL = {
    "lts": {"epochs": 2, "lr": 1e-2},
    "selective": {"epochs": 2, "max_pixels": 1500, "batch_size": 256},
    "vs": {"max_iter": 10}, "ms": {"max_iter": 10}, "ets": {"max_iter": 10},
    "dirichlet": {"max_iter": 10, "reg_lambda": 1e-3},
}
CAL_NAMES = sorted(n for n, cls in CALIBRATORS.items() if cls.__module__.startswith("segcal."))


@pytest.mark.parametrize("name", CAL_NAMES)
def test_calibrators(device, name):
    z, y, img, _ = _data(3)

    def fitted(dev: torch.device | None):
        torch.manual_seed(0)
        cal = get_calibrator(name, **FAST_CAL.get(name, {}))
        put = (lambda t: t.to(dev)) if dev is not None else (lambda t: t)
        return cal.fit(put(z), put(y), images=put(img) if cal.needs_images else None), put

    ref, _ = fitted(None)
    cal, put = fitted(device)
    kw = {"images": put(img)} if cal.needs_images else {}
    ref_kw = {"images": img} if ref.needs_images else {}
    _close(cal.transform(put(z), **kw), ref.transform(z, **ref_kw), device, tol=1e-3)
    _close(cal.predict_proba(put(z), **kw), ref.predict_proba(z, **ref_kw), device, tol=1e-3)


# --- losses ----------------------------------------------------------------------------------------------------------

LOSS_KW = {"aslp": {"warmup_epochs": 0, "multiclass": True}}


def _loss(name: str):
    loss = get_loss(name, **LOSS_KW.get(name, {}))
    if getattr(loss, "needs_ids", False):
        loss.on_epoch_start(0, val_accuracy=0.9)
    return loss


def _call(loss, z, y):
    ids = {"ids": [f"img{i}" for i in range(len(z))]} if getattr(loss, "needs_ids", False) else {}
    return loss(z, y, **ids)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_value_and_gradient(device, name):
    z, y, _, _ = _data(4)
    z_ref = z.clone().requires_grad_(True)
    ref = _call(_loss(name), z_ref, y)
    ref.backward()
    zd = z.to(device).requires_grad_(True)
    val = _call(_loss(name).to(device), zd, y.to(device))
    val.backward()
    _close(val.detach(), ref.detach(), device, tol=1e-5)
    _close(zd.grad, z_ref.grad, device, tol=1e-5)


# --- detectors -------------------------------------------------------------------------------------------------------

FAST_DET = {
    "flowenedet-u": {"epochs": 1, "warmup_steps": 1, "n_blocks": 2},
    "flowenedet-c": {"epochs": 1, "warmup_steps": 1, "n_blocks": 2},
}
DET_NAMES = sorted(n for n, cls in DETECTORS.items() if cls.__module__.startswith("segcal."))


def _det(name: str):
    kw = dict(FAST_DET.get(name, {}))
    if name == "selective":
        kw["calibrator"] = get_calibrator("selective", epochs=2, max_pixels=1500, batch_size=256)
    return get_detector(name, **kw)


@pytest.mark.parametrize("name", DET_NAMES)
def test_detectors(device, name):
    z, y, _, f = _data(5)

    def fitted(dev: torch.device | None):
        torch.manual_seed(0)
        det = _det(name)
        put = (lambda t: t.to(dev)) if dev is not None else (lambda t: t)
        batches = [{"logits": put(z[i:i + 2]), "target": put(y[i:i + 2]), "features": put(f[i:i + 2])}
                   for i in range(0, 4, 2)]
        return det.fit(batches), put

    ref, _ = fitted(None)
    det, put = fitted(device)
    got = det.score(put(z), features=put(f) if det.needs_features else None)
    want = ref.score(z, features=f if ref.needs_features else None)
    assert got.shape == (4, H, W)
    _close(got, want, device, tol=1e-3)
