"""The CRC guarantee on randomised exchangeable data, and its visible failure under shift."""

from __future__ import annotations

import math

import pytest
import torch

from segcal.conformal import CoverageRiskControl, FNRControl, resplit_thresholds, threshold_from_curves

from ._synthetic import make_data

N_POOL, N_CAL, SPLITS = 600, 100, 400


def _resplit_risks(ctrl, curves, n_cal: int, splits: int, seed: int) -> torch.Tensor:
    """Test risk at the calibrated λ̂ for many random calibration/test splits of one exchangeable pool."""
    losses, grid, counted = curves["losses"], curves["grid"], curves["counted"]
    n = losses.shape[0]
    g = torch.Generator().manual_seed(seed)
    cal = torch.zeros(splits, n, dtype=torch.bool)
    for s in range(splits):
        cal[s, torch.randperm(n, generator=g)[:n_cal]] = True
    lam = resplit_thresholds(losses, grid, ctrl.alpha, cal, counted=counted)
    j = torch.searchsorted(grid, lam)
    test = (~cal & counted[None]).double()
    at_lam = losses.T[j]  # (S, N): every image's loss at its split's threshold
    return (at_lam * test).sum(1) / test.sum(1)


@pytest.fixture(scope="module")
def pool():
    return make_data(N_POOL, seed=1)


@pytest.mark.parametrize("ctrl", [CoverageRiskControl(alpha=0.1, epsilon=0.1, n_grid=501, batch_size=64),
                                  CoverageRiskControl(alpha=0.1, loss="fraction", score="aps", n_grid=501,
                                                      batch_size=64),
                                  FNRControl(alpha=0.1, class_index=1, n_grid=501, batch_size=64)],
                         ids=["coverage-indicator", "coverage-fraction-aps", "fnr"])
def test_mean_test_risk_is_at_most_alpha_and_not_wildly_conservative(pool, ctrl) -> None:
    curves = ctrl.per_image_curves(*pool)
    risks = _resplit_risks(ctrl, curves, N_CAL, SPLITS, seed=0)
    mc = 3 * float(risks.std()) / math.sqrt(SPLITS)
    # Theorem 1: E[L] <= alpha; Theorem 2 (continuous losses): E[L] >= alpha - 2B/(n+1). The re-splits share one pool,
    # so the Monte Carlo margin is a little optimistic; 3 SE plus the grid step keeps the test honest but stable.
    assert float(risks.mean()) <= ctrl.alpha + mc
    assert float(risks.mean()) >= ctrl.alpha - 2 / (N_CAL + 1) - mc - 0.02


def test_the_fitted_threshold_equals_the_resplit_thresholds(pool) -> None:
    z, y = pool
    ctrl = CoverageRiskControl(alpha=0.1, epsilon=0.1, n_grid=501, refine=False, batch_size=64)
    curves = ctrl.per_image_curves(z[:2 * N_CAL], y[:2 * N_CAL])
    fitted = ctrl.fit(z[:N_CAL], y[:N_CAL]).threshold_
    assert fitted == threshold_from_curves(curves["losses"][:N_CAL], curves["grid"], 0.1)
    cal = torch.zeros(2, 2 * N_CAL, dtype=torch.bool)
    cal[0, :N_CAL] = True
    cal[1, N_CAL:] = True
    lams = resplit_thresholds(curves["losses"], curves["grid"], 0.1, cal)
    assert float(lams[0]) == fitted
    assert float(lams[1]) == ctrl.fit(z[N_CAL:2 * N_CAL], y[N_CAL:2 * N_CAL]).threshold_


def test_broken_exchangeability_fails_visibly(pool) -> None:
    """Calibrate on the pool, test on images whose labels are much noisier than the model says (a shift)."""
    z, y = pool
    ctrl = CoverageRiskControl(alpha=0.1, epsilon=0.1, n_grid=501, batch_size=64).fit(z[:200], y[:200])
    zs, ys = make_data(300, seed=7, label_temperature=4.0)
    shifted = ctrl.per_image_curves(zs, ys, grid=torch.tensor([ctrl.threshold_], dtype=torch.float64))
    same = ctrl.per_image_curves(z[200:], y[200:], grid=torch.tensor([ctrl.threshold_], dtype=torch.float64))
    risk_shift = float(shifted["losses"].mean())
    risk_same = float(same["losses"].mean())
    assert risk_same <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 400)
    assert risk_shift > 0.3  # far above alpha: the guarantee is void under shift, and it shows
