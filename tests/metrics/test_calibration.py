import math

import numpy as np
import pytest
import torch

from segcal.metrics import CalibrationMetrics
from segcal.metrics import functional as F

from ._reference import realistic_logits, reference

KEYS = ["ece", "mce", "oe", "accuracy", "ace", "cw_ece", "nll", "brier", "miou", "image_ece"]
# MCE divides by one bin's count, so it sees the fixed-point rounding (<= 3e-8 per bin and batch) and, in float32,
# any pixel that sits within float32 rounding of a bin edge; it gets a looser tolerance.
MCE_TOL = {torch.float64: 1e-7, torch.float32: 1e-4}


def _data(seed=0, n=3, c=5, h=12, w=20, ignore_frac=0.1, dtype=torch.float32):
    logits, target = realistic_logits(n, c, h, w, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    target[torch.rand(target.shape, generator=g) < ignore_frac] = 255
    return logits.to(dtype), target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference_over_batches(dtype):
    logits, target = _data(n=4, h=15, w=16, dtype=dtype)  # 4*240 pixels minus ignore
    m = CalibrationMetrics(5)
    for i in range(4):
        m.update(logits[i:i + 1], target[i:i + 1])
    got = m.compute()
    ref = reference(logits, target)
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    for k in KEYS:
        if k == "mce":
            assert float(got[k]) == pytest.approx(ref[k], abs=MCE_TOL[dtype])
        elif k == "ace":
            assert abs(float(got[k]) - ref[k]) <= float(got["ace_error_bound"]) + tol, k
        else:
            assert float(got[k]) == pytest.approx(ref[k], abs=tol), k


def test_ace_exact_when_fine_bins_resolve_every_pixel():
    logits, target = _data(seed=3, n=1, h=15, w=20, ignore_frac=0.0, dtype=torch.float64)  # 300 = 20 * 15
    m = CalibrationMetrics(5, n_bins=15, ace_resolution=2**20)
    m.update(logits, target)
    assert int(m.fine_count.max()) == 1  # the premise: every pixel has a fine bin of its own
    out = m.compute()
    ref = reference(logits, target)
    # the bound covers the histogram approximation; 1e-9 covers the fixed-point rounding of the sums
    assert abs(float(out["ace"]) - ref["ace"]) <= float(out["ace_error_bound"]) + 1e-9
    assert float(out["ace_error_bound"]) < 1e-3


def test_probs_input_and_exclude_classes():
    logits, target = _data(seed=5, dtype=torch.float64)
    probs = torch.softmax(logits, 1)
    a = F.calibration_metrics(probs, target, input="probs", exclude_classes=[0])
    ref = reference(probs, target, input="probs", exclude=(0,))
    for k in KEYS:
        if k != "ace":
            tol = MCE_TOL[torch.float64] if k == "mce" else 1e-9
            assert float(a[k]) == pytest.approx(ref[k], abs=tol), k
    b = F.calibration_metrics(logits, target, exclude_classes=[0])
    assert float(a["ece"]) == pytest.approx(float(b["ece"]), abs=1e-12)


def test_bin_edges_one_in_last_bin_zero_in_first():
    # Two classes, probs exactly 1.0 / 0.0: confidence 1.0 must land in the last bin, p=0 in bin 0.
    probs = torch.tensor([1.0, 0.5, 0.0, 0.5], dtype=torch.float64).view(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    m = CalibrationMetrics(2, n_bins=4, input="probs")
    m.update(probs, target)
    rel = m.reliability()
    assert rel["count"].tolist() == [0, 1, 0, 1]  # 0.5 -> bin 1 = (0.25, 0.5]; 1.0 -> bin 3
    assert float(m.compute()["cw_ece"]) >= 0.0


def test_functional_equals_class():
    logits, target = _data(seed=7)
    m = CalibrationMetrics(5)
    m.update(logits, target)
    out = m.compute()
    for name, key in [("ece", "ece"), ("mce", "mce"), ("adaptive_ece", "ace"), ("classwise_ece", "cw_ece"),
                      ("nll", "nll"), ("brier", "brier"), ("overconfidence_error", "oe"), ("miou", "miou")]:
        assert float(getattr(F, name)(logits, target)) == float(out[key]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_close_to_float32(dtype):
    logits, target = _data(seed=9)
    a = F.calibration_metrics(logits.to(dtype), target)
    b = F.calibration_metrics(logits.to(dtype).float(), target)
    for k in KEYS:
        assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-7), k


def test_boundary_and_interior_partition_pixels():
    logits, target = _data(seed=11, h=24, w=24)
    m = CalibrationMetrics(5, boundary_width=2)
    m.update(logits, target)
    out = m.compute()
    plain = F.calibration_metrics(logits, target)
    rb, ri = m.reliability("boundary"), m.reliability("interior")
    assert torch.equal(rb["count"] + ri["count"], m.reliability()["count"])
    f = float(out["boundary_fraction"])
    assert 0 < f < 1
    # pooled ECE <= weighted sum of the parts (triangle inequality per bin)
    assert float(plain["ece"]) <= f * float(out["boundary_ece"]) + (1 - f) * float(out["interior_ece"]) + 1e-12
    assert float(out["ece"]) == pytest.approx(float(plain["ece"]), abs=1e-9)


def test_empty_metric_returns_nan_and_all_ignored_contributes_nothing():
    m = CalibrationMetrics(3)
    logits = torch.randn(2, 3, 4, 4)
    m.update(logits, torch.full((2, 4, 4), 255))
    out = m.compute()
    assert math.isnan(float(out["ece"])) and math.isnan(float(out["image_ece"]))
    logits2, target2 = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4))
    m.update(logits2, target2)
    ref = F.calibration_metrics(logits2, target2)
    for k in KEYS:
        assert float(m.compute()[k]) == float(ref[k]), k


def test_state_size_is_constant():
    m = CalibrationMetrics(4)
    sizes = [v.numel() for v in m.metric_state.values()]
    for _ in range(3):
        m.update(torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8)))
    assert [v.numel() for v in m.metric_state.values()] == sizes
    assert all(v.dtype == torch.int64 for v in m.metric_state.values())


def test_saturated_nll_is_finite_and_correct():
    logits = torch.tensor([[[[0.0]], [[200.0]]]])  # p_y for class 0 underflows in float32
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    got = float(F.nll(logits, target))
    assert got == pytest.approx(200.0, rel=1e-6)
    assert np.isfinite(got)


@pytest.mark.realdata
def test_camvid_labels_against_reference(camvid_labels):
    target = camvid_labels[:, ::4, ::4].contiguous()
    logits, _ = realistic_logits(target.shape[0], 11, target.shape[1], target.shape[2], seed=0)
    m = CalibrationMetrics(11, boundary_width=2)
    m.update(logits, target)
    out = m.compute()
    ref = reference(logits, target)
    for k in KEYS:
        if k != "ace":
            tol = MCE_TOL[torch.float32] if k == "mce" else 2e-6
            assert float(out[k]) == pytest.approx(ref[k], abs=tol), k


def test_classwise_off_gives_same_values_without_cw():
    logits, target = _data(seed=13)
    a, b = CalibrationMetrics(5), CalibrationMetrics(5, classwise=False)
    a.update(logits, target)
    b.update(logits, target)
    oa, ob = a.compute(), b.compute()
    assert "cw_ece" not in ob
    for k in ob:
        assert torch.equal(oa[k], ob[k]) or (torch.isnan(oa[k]).all() and torch.isnan(ob[k]).all()), k
