import math

import pytest
import torch

from segcal.metrics import CalibrationMetrics, PerImageCalibrationStats, bootstrap_indices, paired_bootstrap
from segcal.metrics.bootstrap import _resampled_diffs

C = 3


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, 6, 5, generator=g, dtype=torch.float64) * 2.5
    target = torch.randint(0, C, (n, 6, 5), generator=g)
    target[:, 0, :2] = 255
    return logits, target


def _collect(logits, target, **kw):
    s = PerImageCalibrationStats(C, n_bins=10, **kw)
    s.update(logits[:4], target[:4])  # two batches: images stay in update order
    s.update(logits[4:], target[4:])
    return s


def _brute(logits, target, idx, key, **kw):
    m = CalibrationMetrics(C, n_bins=10, ace_resolution=16, **kw)  # ACE is not bootstrapped; small fine histogram
    m.update(logits[idx], target[idx])  # the resampled images, pixels recomputed from scratch
    return float(m.compute()[key])


@pytest.mark.parametrize("key", ["ece", "mce", "oe", "nll", "brier", "accuracy", "miou", "cw_ece", "image_ece"])
def test_resampled_values_equal_brute_force(key):
    logits, target = _data()
    a_logits = logits / 2.0  # "method A": temperature 2
    a, b = _collect(a_logits, target, classwise=True), _collect(logits, target, classwise=True)
    idx = bootstrap_indices(6, 8, seed=3)
    diffs = _resampled_diffs(a, b, key, idx)
    for r in range(8):
        expected = _brute(a_logits, target, idx[r], key) - _brute(logits, target, idx[r], key)
        assert float(diffs[r]) == pytest.approx(expected, abs=1e-10), (key, r)


def test_full_data_equals_calibration_metrics():
    logits, target = _data()
    s = _collect(logits, target, boundary_width=1)
    ref = CalibrationMetrics(C, n_bins=10, boundary_width=1)
    ref.update(logits, target)
    got, exp = s.pooled(), ref.compute()
    for key in ("ece", "mce", "oe", "nll", "brier", "accuracy", "miou", "image_ece", "boundary_ece", "interior_ece"):
        assert float(got[key]) == pytest.approx(float(exp[key]), abs=1e-12), key


def test_interval_is_the_percentile_of_brute_force_diffs_and_seeded():
    logits, target = _data(n=8, seed=1)
    a, b = _collect(logits / 3.0, target), _collect(logits, target)
    out = paired_bootstrap(a, b, "ece", n_resamples=40, seed=7)
    idx = bootstrap_indices(8, 40, seed=7)
    brute = torch.tensor([_brute(logits / 3.0, target, i, "ece") - _brute(logits, target, i, "ece") for i in idx],
                         dtype=torch.float64)
    low, high = torch.quantile(brute, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert out["low"] == pytest.approx(low, abs=1e-10) and out["high"] == pytest.approx(high, abs=1e-10)
    assert out["diff"] == pytest.approx(_brute(logits / 3.0, target, torch.arange(8), "ece")
                                        - _brute(logits, target, torch.arange(8), "ece"), abs=1e-10)
    assert out["significant"] == (low > 0 or high < 0)
    assert set(out) == {"metric", "diff", "low", "high", "level", "n_resamples", "seed", "significant"}
    assert paired_bootstrap(a, b, "ece", n_resamples=40, seed=7) == out
    assert paired_bootstrap(a, b, "ece", n_resamples=40, seed=8) != out


def test_identical_methods_are_not_significant_and_a_large_effect_is():
    logits, target = _data(n=10, seed=2)
    a, b = _collect(logits, target), _collect(logits, target)
    out = paired_bootstrap(a, b, "ece", n_resamples=50)
    assert out["diff"] == 0.0 and out["low"] == 0.0 and out["high"] == 0.0 and not out["significant"]
    # logits * 0 -> uniform 1/3 confidence, accuracy ~1/3: nearly calibrated; sharp random logits are not
    sharp = _collect(logits * 20, target)
    flat = _collect(logits * 1e-3, target)
    big = paired_bootstrap(flat, sharp, "ece", n_resamples=50)
    assert big["significant"] and big["high"] < 0


def test_bad_arguments():
    logits, target = _data()
    a = _collect(logits, target)
    b = PerImageCalibrationStats(C, n_bins=10)
    b.update(logits[:3], target[:3])
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="metric"):
        paired_bootstrap(a, a, "ace")
    with pytest.raises(ValueError, match="metric"):
        paired_bootstrap(a, a, "cw_ece")  # needs classwise=True
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(a, a, level=95)
    with pytest.raises(TypeError, match="`b`"):
        paired_bootstrap(a, {"ece": 1})
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(PerImageCalibrationStats(C).pooled()["ece"]))


def test_on_device(device):
    logits, target = _data()
    a = PerImageCalibrationStats(C, n_bins=10).to(device)
    b = PerImageCalibrationStats(C, n_bins=10).to(device)
    a.update(logits.to(device) / 2, target.to(device))
    b.update(logits.to(device), target.to(device))
    cpu_a, cpu_b = _collect(logits / 2, target), _collect(logits, target)
    assert paired_bootstrap(a, b, n_resamples=20) == paired_bootstrap(cpu_a, cpu_b, n_resamples=20)
