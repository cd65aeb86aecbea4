"""Per-method behaviour: known-answer and reference comparisons."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar

from segcal.calibrators import (
    DirichletScaling,
    EnsembleTemperatureScaling,
    HistogramBinning,
    IsotonicCalibration,
    LocalTemperatureScaling,
    MatrixScaling,
    SelectiveScaling,
    TemperatureScaling,
    VectorScaling,
)


def sample(n=6, c=5, h=24, w=24, temp=1.7, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, h, w, generator=g) * scale
    p = torch.softmax(z / temp, 1).permute(0, 2, 3, 1).reshape(-1, c)
    y = torch.multinomial(p, 1, generator=g).view(n, h, w)
    y[:, :2] = 255
    return z, y


def flat(z, y):
    mask = y != 255
    return z.permute(0, 2, 3, 1)[mask].double().numpy(), y[mask].numpy()


def nll64(logits: np.ndarray, y: np.ndarray) -> float:
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


def ece64(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    mask = y != 255
    conf, pred = probs.double().max(1)
    conf, correct = conf[mask], (pred == y)[mask].double()
    b = (conf * n_bins).ceil().clamp(1, n_bins).long() - 1
    tot = 0.0
    for k in range(n_bins):
        sel = b == k
        if sel.any():
            tot += float(sel.sum()) * abs(float(correct[sel].mean() - conf[sel].mean()))
    return tot / int(mask.sum())


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    s, p = score.flatten().double(), positive.flatten()
    ranks = s.argsort().argsort().double() + 1
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -- temperature scaling --------------------------------------------------------------------------------------
def test_ts_recovers_known_temperature() -> None:
    z, y = sample(n=8, h=48, w=48, temp=1.7)
    ts = TemperatureScaling().fit(z, y)
    assert ts.temperature_ == pytest.approx(1.7, rel=0.04)
    z, y = sample(n=8, h=48, w=48, temp=0.6, seed=1)
    assert TemperatureScaling().fit(z, y).temperature_ == pytest.approx(0.6, rel=0.04)


def test_ts_matches_float64_reference_optimum() -> None:
    z, y = sample(temp=1.3, seed=2)
    zf, yf = flat(z, y)
    ref = minimize_scalar(lambda lt: nll64(zf / math.exp(lt), yf), bounds=(-3, 3), method="bounded",
                          options={"xatol": 1e-9})
    ts = TemperatureScaling().fit(z, y)
    assert ts.temperature_ == pytest.approx(math.exp(ref.x), rel=1e-4)
    assert ts.nll_ == pytest.approx(ref.fun, rel=1e-5)
    # Seeded pixel subsample: close, and reproducible.
    sub = TemperatureScaling(max_pixels=1500, seed=3).fit(z, y)
    assert sub.temperature_ == pytest.approx(math.exp(ref.x), rel=0.1)
    assert TemperatureScaling(max_pixels=1500, seed=3).fit(z, y).temperature_ == sub.temperature_


def test_ts_separable_data_stops_at_bound() -> None:
    z, _ = sample()
    z = z * 100
    y = z.argmax(1)
    ts = TemperatureScaling(t_bounds=(0.1, 10.0)).fit(z, y)
    assert ts.temperature_ == pytest.approx(0.1)
    assert torch.isfinite(ts.transform(z)).all()


# -- vector / matrix / dirichlet: float64 scipy references -----------------------------------------------------
def _affine_data(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    c = 3
    z = torch.randn(4, c, 16, 16, generator=g) * 3
    w_true = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.8, 0.0], [0.0, -0.2, 0.3]])
    logits = torch.einsum("kc,nchw->nkhw", w_true, z) + torch.tensor([0.3, -0.2, 0.1]).view(1, -1, 1, 1)
    y = torch.multinomial(torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, c), 1, generator=g)
    y = y.view(4, 16, 16)
    y[:, 0] = 255
    return z, y


def _scipy_fit(f, x0):
    return minimize(f, x0, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000})


def test_vector_scaling_matches_scipy() -> None:
    z, y = _affine_data()
    zf, yf = flat(z, y)
    c = zf.shape[1]
    ref = _scipy_fit(lambda p: nll64(zf * p[:c] + p[c:], yf), np.r_[np.ones(c), np.zeros(c)])
    vs = VectorScaling().fit(z, y)
    assert vs.nll_ == pytest.approx(ref.fun, abs=1e-6)
    np.testing.assert_allclose(vs.weight_.numpy(), ref.x[:c], atol=2e-3)
    np.testing.assert_allclose(vs.bias_.numpy(), ref.x[c:], atol=2e-3)


def test_matrix_scaling_matches_scipy() -> None:
    z, y = _affine_data(5)
    zf, yf = flat(z, y)
    c = zf.shape[1]
    ref = _scipy_fit(lambda p: nll64(zf @ p[:c * c].reshape(c, c).T + p[c * c:], yf),
                     np.r_[np.eye(c).ravel(), np.zeros(c)])
    ms = MatrixScaling().fit(z, y)
    assert ms.nll_ == pytest.approx(ref.fun, abs=1e-6)
    np.testing.assert_allclose(ms.weight_.numpy().ravel(), ref.x[:c * c], atol=3e-3)


def test_dirichlet_odir_shrinks_off_diagonal() -> None:
    z, y = _affine_data(6)
    free = DirichletScaling().fit(z, y)
    reg = DirichletScaling(reg_lambda=100.0).fit(z, y)
    off = 1 - torch.eye(3)
    assert (reg.weight_ * off).abs().sum() < 0.2 * (free.weight_ * off).abs().sum()
    zf, yf = flat(z, y)
    logp = zf - np.log(np.exp(zf - zf.max(1, keepdims=True)).sum(1, keepdims=True)) - zf.max(1, keepdims=True)
    assert free.nll_ < nll64(logp, yf) - 1e-3  # better than the identity start


# -- ensemble TS ---------------------------------------------------------------------------------------------
def test_ets_weights_on_simplex_and_beats_ts() -> None:
    z, y = sample(temp=2.0, seed=7)
    y_noisy = y.clone()
    g = torch.Generator().manual_seed(0)
    flip = (torch.rand(y.shape, generator=g) < 0.2) & (y != 255)
    y_noisy[flip] = torch.randint(0, 5, (int(flip.sum()),), generator=g)
    ets = EnsembleTemperatureScaling().fit(z, y_noisy)
    w = ets.weights_
    assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    ts = TemperatureScaling().fit(z, y_noisy)
    assert ets.temperature_ == pytest.approx(ts.temperature_)
    assert ets.nll_ <= ts.nll_ + 1e-9
    assert w[2] > 0.05  # label noise makes the uniform component useful


# -- binning ---------------------------------------------------------------------------------------------------
def test_histogram_and_isotonic_reduce_ece_of_overconfident_model() -> None:
    z, y = sample(temp=3.0, seed=8)  # logits 3x too sharp
    before = ece64(torch.softmax(z, 1), y)
    for cal in (HistogramBinning(), HistogramBinning(strategy="quantile"), IsotonicCalibration(),
                IsotonicCalibration(mode="one-vs-rest")):
        cal.fit(z, y)
        assert ece64(cal.predict_proba(z), y) < 0.5 * before, cal


def test_isotonic_table_is_monotone() -> None:
    z, y = sample(seed=9)
    for mode in ("top-label", "one-vs-rest"):
        t = IsotonicCalibration(mode=mode).fit(z, y).table_
        assert (t.diff(dim=1) >= -1e-7).all()


# -- LTS -------------------------------------------------------------------------------------------------------
def test_lts_starts_at_the_ts_solution() -> None:
    z, y = sample(n=2, h=16, w=16, temp=1.5, seed=10)
    img = torch.rand(2, 3, 16, 16)
    lts = LocalTemperatureScaling(epochs=0).fit(z, y, images=img)
    ts = TemperatureScaling().fit(z, y)
    torch.testing.assert_close(lts.temperature_map(z, img), torch.full((2, 16, 16), ts.temperature_))
    trained = LocalTemperatureScaling(epochs=3, lr=1e-2).fit(z, y, images=img)
    assert trained.history_[-1] <= trained.history_[0] + 1e-6
    with pytest.raises(ValueError, match="images"):
        LocalTemperatureScaling().fit(z, y)
    with pytest.raises(ValueError, match="images"):
        lts.transform(z)


# -- selective scaling ---------------------------------------------------------------------------------------
def _detectable_errors(seed: int = 11, n: int = 12):
    """Model wrong exactly where its top-2 margin is small; confident (overconfident) there anyway."""
    g = torch.Generator().manual_seed(seed)
    c = 4
    z = torch.randn(n, c, 24, 24, generator=g) * 4
    top2 = z.topk(2, 1)
    wrong = (top2.values[:, 0] - top2.values[:, 1]) < 2.0
    y = torch.where(wrong, top2.indices[:, 1], top2.indices[:, 0])
    y[:, :2] = 255
    return z, y, wrong


def test_selective_reduces_ece_and_keeps_argmax() -> None:
    torch.manual_seed(0)
    z, y, wrong = _detectable_errors()
    sel = SelectiveScaling(epochs=6, max_pixels=6000, batch_size=128, lr=3e-3).fit(z, y)
    out = sel.transform(z)
    assert torch.equal(out.argmax(1), z.argmax(1))
    before, after = ece64(torch.softmax(z, 1), y), ece64(torch.softmax(out, 1), y)
    assert after < 0.75 * before
    mis = sel.misprediction_proba(z)
    assert mis.shape == (12, 24, 24) and ((mis >= 0) & (mis <= 1)).all()
    valid = y != 255
    assert auroc(mis[valid], wrong[valid]) > 0.85
    assert sel.temperature_mis_ > 1.5
    assert 0 <= sel.best_epoch_ <= 6 and len(sel.history_["val"]) == 6


def test_selective_mis_temperature_override_and_base_composition() -> None:
    z, y, _ = _detectable_errors(12, n=6)
    fixed = SelectiveScaling(None, mis_temperature=3.0, epochs=2, max_pixels=3000).fit(z, y)  # paper form
    assert fixed.temperature_mis_ == 3.0
    flagged = (fixed.misprediction_proba(z) > 0.5)[:, None].expand_as(z)
    out = fixed.transform(z)
    torch.testing.assert_close(out[flagged], z[flagged] / 3.0)
    torch.testing.assert_close(out[~flagged], z[~flagged])

    comp = SelectiveScaling(TemperatureScaling(), mis_temperature=3.0, epochs=2, max_pixels=3000).fit(z, y)
    assert comp.base is not comp.base_ and not hasattr(comp.base, "temperature_")
    flagged = (comp.misprediction_proba(z) > 0.5)[:, None].expand_as(z)
    torch.testing.assert_close(comp.transform(z)[~flagged], z[~flagged] / comp.base_.temperature_)

    with pytest.raises(ValueError, match="argmax"):
        SelectiveScaling(VectorScaling(), epochs=1).fit(z, y)
    with pytest.raises(ValueError, match="mis_temperature"):
        SelectiveScaling(mis_temperature=-1.0).fit(z, y)


def test_prob_logit_is_exact_and_stable() -> None:
    from segcal.calibrators._binning import prob_logit

    z = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 30
    z[0, 1] = z[0, 2]  # ties at the top
    ref = torch.stack([z[:, k] - torch.logsumexp(torch.cat([z[:, :k], z[:, k + 1:]], 1), 1) for k in range(5)], 1)
    torch.testing.assert_close(prob_logit(z, 1), ref)
    torch.testing.assert_close(prob_logit(z.float(), 1).double(), ref, atol=1e-4, rtol=1e-6)
