"""ASLP: SC-BCE, the adaptive α update, its state, and segcal's multi-class extension."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcal.losses import ASLP, SCBCELoss
from segcal.losses import functional as LF
from segcal.losses.aslp import alpha_max

IGN = 255


def _binary(b=3, h=4, w=5, seed=0, ignore_frac=0.2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(b, 1, h, w, generator=g)).to(dtype)
    y = torch.randint(0, 2, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < ignore_frac] = IGN
    return x, y


def _bce_ls(x, y, eps):
    """BCE against (1 - ε)·y + ε/2 over valid pixels, ε per image."""
    valid = y != IGN
    yf = torch.where(valid, y, 0).double()
    t = (1 - eps.view(-1, 1, 1)) * yf + eps.view(-1, 1, 1) / 2
    m = F.binary_cross_entropy_with_logits(x[:, 0], t, reduction="none")
    return (m * valid).sum() / valid.sum()


# --- SC-BCE ---------------------------------------------------------------------------------------------------------

def test_sc_bce_targets_follow_the_paper():
    x = torch.tensor([0.3, -1.2], dtype=torch.float64).view(1, 1, 1, 2)
    y = torch.tensor([[[0, 1]]])
    beta = 2.0
    got = LF.sc_bce(x, y, beta=beta, z=torch.tensor([1]), reduction="none")[0, 0]
    t = torch.tensor([beta, 1 - beta], dtype=torch.float64)  # (1 - 2β)y + β
    s = torch.sigmoid(x.flatten())
    torch.testing.assert_close(got, -(t * s.log() + (1 - t) * (1 - s).log()))
    # Z = 0 is plain BCE; alpha = 0 never perturbs
    torch.testing.assert_close(LF.sc_bce(x, y, beta=beta, z=torch.tensor([0])),
                               F.binary_cross_entropy_with_logits(x[:, 0], y.double()))
    torch.testing.assert_close(LF.sc_bce(x, y, alpha=0.0, generator=1), LF.sc_bce(x, y, z=torch.tensor([0])))


def test_sc_bce_accepts_both_binary_layouts_and_reductions():
    x, y = _binary()
    a = LF.sc_bce(x, y, alpha=0.3, generator=5, reduction="none")
    torch.testing.assert_close(a, LF.sc_bce(x[:, 0], y, alpha=0.3, generator=5, reduction="none"))
    assert a.shape == y.shape and (a[y == IGN] == 0).all()
    torch.testing.assert_close(LF.sc_bce(x, y, alpha=0.3, generator=5), a.sum() / (y != IGN).sum())
    torch.testing.assert_close(LF.sc_bce(x, y, alpha=0.3, generator=5, reduction="sum"), a.sum())


def test_sc_bce_bad_input_raises():
    x, y = _binary()
    with pytest.raises(ValueError, match="logits"):
        LF.sc_bce(x.repeat(1, 2, 1, 1), y)
    bad = y.clone()
    bad[0, 0, 0] = 2
    with pytest.raises(ValueError, match="outside"):
        LF.sc_bce(x, bad)
    with pytest.raises(ValueError, match="alpha"):
        LF.sc_bce(x, y, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        LF.sc_bce(x, y, alpha=torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        LF.sc_bce(x, y, beta=0.0)
    with pytest.raises(ValueError, match="z"):
        LF.sc_bce(x, y, z=torch.tensor([0, 2, 1]))
    with pytest.raises(TypeError, match="target"):
        LF.sc_bce(x, y.float())


def test_sc_bce_gradcheck():
    x, y = _binary(b=2, h=2, w=3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: LF.sc_bce(t, y, beta=2.0, z=torch.tensor([1, 0])), (x,))


def test_sc_bce_deterministic_given_seed():
    x, y = _binary(b=6)
    a = LF.sc_bce(x, y, alpha=0.5, generator=11)
    assert a == LF.sc_bce(x, y, alpha=0.5, generator=torch.Generator().manual_seed(11))
    draws = {LF.sc_bce(x, y, alpha=0.5, generator=s).item() for s in range(8)}
    assert len(draws) > 1  # the seed does change the draws


def test_module_equals_function():
    x, y = _binary()
    torch.testing.assert_close(SCBCELoss(alpha=0.4, beta=1.0, seed=3)(x, y),
                               LF.sc_bce(x, y, alpha=0.4, beta=1.0, generator=3))


@pytest.mark.parametrize("beta", [2.0, 0.5, 1.0, 0.3])
def test_expectation_is_label_smoothing_exact(beta):
    x, y = _binary(b=3)
    alpha = torch.tensor([0.0, 0.2, min(0.9, 1 / (2 * beta) - 0.01)], dtype=torch.float64)
    # exact expectation over the 2^B outcomes of Z, weighted by their probabilities
    expectation = torch.zeros((), dtype=torch.float64)
    for bits in range(2 ** 3):
        z = torch.tensor([(bits >> i) & 1 for i in range(3)])
        prob = torch.prod(torch.where(z == 1, alpha, 1 - alpha))
        expectation = expectation + prob * LF.sc_bce(x, y, beta=beta, z=z, reduction="sum")
    torch.testing.assert_close(expectation / (y != IGN).sum(), _bce_ls(x, y, 2 * alpha * beta))


def test_expectation_monte_carlo():
    # one image repeated n times in one batch: each copy draws its own Z, so the batch mean is a Monte-Carlo estimate
    x, y = _binary(b=1, ignore_frac=0.0)
    n, alpha, beta = 4000, 0.15, 2.0
    xs, ys = x.expand(n, -1, -1, -1), y.expand(n, -1, -1)
    per_image = LF.sc_bce(xs, ys, alpha=alpha, beta=beta, generator=0, reduction="none").mean(dim=(1, 2))
    target = _bce_ls(x, y, torch.tensor([2 * alpha * beta], dtype=torch.float64))
    assert abs(per_image.mean() - target) < 5 * per_image.std() / math.sqrt(n)
    clean = LF.sc_bce(x, y, z=torch.zeros(1))
    assert abs(clean - target) > 10 * per_image.std() / math.sqrt(n)  # the check can tell perturbed from clean
    assert abs(((per_image - clean).abs() > 1e-9).double().mean() - alpha) < 0.03  # fraction of perturbed images


def _a(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


# --- α update -------------------------------------------------------------------------------------------------------

def test_alpha_update_hand_computed_step():
    # one image, two pixels: p = sigmoid(logits) = (0.5, 0.75), labels (1, 0)
    x = torch.tensor([0.0, math.log(3)], dtype=torch.float64).view(1, 1, 1, 2)
    y = torch.tensor([[[1, 0]]])
    bce = (-math.log(0.5) - math.log(0.25)) / 2
    bce_flip = (-math.log(0.5) - math.log(0.75)) / 2
    beta, eta, lam, acc, a0 = 2.0, 0.002, 1.0, 0.9, 0.1
    expected = a0 + eta * ((bce_flip - bce) / beta + lam * min((1 - acc) - beta * a0, 0))
    got = LF.aslp_alpha_update(_a(a0), x, y, acc, beta, eta, lam)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # constraint inactive when the error rate exceeds the expected label noise
    expected2 = a0 + eta * (bce_flip - bce) / beta
    assert LF.aslp_alpha_update(_a(a0), x, y, 0.5, beta, eta, lam).item() == pytest.approx(expected2)


def test_alpha_update_ignores_ignore_pixels_and_empty_images():
    x = torch.tensor([[0.0, math.log(3), 7.0]], dtype=torch.float64).view(1, 1, 1, 3)
    y = torch.tensor([[[1, 0, IGN]]])
    y2 = y[..., :2]
    a = LF.aslp_alpha_update(_a(0.1), x, y, 0.9, lam=1.0)
    assert a.item() == pytest.approx(LF.aslp_alpha_update(_a(0.1), x[..., :2], y2, 0.9, lam=1.0).item())
    empty = torch.full_like(y, IGN)
    assert LF.aslp_alpha_update(_a(0.1), x, empty, 0.9).item() == 0.1


def test_alpha_update_clipping_bounds():
    # confidently right predictions: BCE(p, 1 - y) >> BCE(p, y) -> α grows; clipped at 1/(2β) - 0.01
    x = torch.full((1, 1, 2, 2), 6.0, dtype=torch.float64)
    y = torch.ones(1, 2, 2, dtype=torch.long)
    for beta in (2.0, 1.0, 0.4):
        up = LF.aslp_alpha_update(_a(0.0), x, y, 0.0, beta=beta, eta=100.0, lam=0.0)
        assert up.item() == pytest.approx(min(1.0, 1 / (2 * beta) - 0.01))
    down = LF.aslp_alpha_update(_a(0.2), -x, y, 1.0, beta=2.0, eta=100.0)
    assert down.item() == 0.0
    assert alpha_max(2.0) == pytest.approx(0.24)


def _released_rule(al: float, beta: float) -> float:
    """The reset of the released main_ASLP.py (per image): < 0 -> 0; >= 1/(2β) -> 1/(2β) - 0.01; else unchanged."""
    if al < 0:
        return 0.0
    if al >= 1 / (2 * beta):
        return 1 / (2 * beta) - 0.01
    return al


@pytest.mark.parametrize("beta", [2.0, 1.0])
def test_alpha_update_keeps_values_just_below_the_bound_as_released(beta):
    # eta = 0: the update is α itself, so only the reset rule acts; 1/(2β) − 0.005 used to be clipped to − 0.01
    bound = 1 / (2 * beta)
    alphas = torch.tensor([0.0, 0.1, bound - 0.01, bound - 0.005, bound - 1e-9, bound, bound + 0.3],
                          dtype=torch.float64)
    x = torch.randn(len(alphas), 1, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (len(alphas), 2, 2))
    got = LF.aslp_alpha_update(alphas, x, y, 0.5, beta=beta, eta=0.0)
    ref = [_released_rule(float(a), beta) for a in alphas]
    assert got.tolist() == pytest.approx(ref, abs=1e-12)
    assert got[3].item() == pytest.approx(bound - 0.005)


# --- the ASLP module ------------------------------------------------------------------------------------------------

def _train(loss_fn, epochs, steps=2, ids_per_batch=(("a", "b", "c"), ("d", "e", "f")), acc=0.7):
    g = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        loss_fn.on_epoch_start(epoch, val_accuracy=acc)
        for s in range(steps):
            ids = ids_per_batch[s % len(ids_per_batch)]
            x = torch.randn(len(ids), 1, 4, 4, generator=g) * 3
            y = torch.randint(0, 2, (len(ids), 4, 4), generator=g)
            loss_fn(x, y, ids=list(ids))


def test_warmup_and_eval_mode_do_not_update():
    loss_fn = ASLP(warmup_epochs=2, eta=0.05, lam=1.0)
    _train(loss_fn, epochs=2)
    assert all(a == 0 for a in loss_fn.alpha_.values()) or not loss_fn.alpha_
    loss_fn.eval()
    _train(loss_fn, epochs=3)
    assert not any(loss_fn.alpha_.values())
    loss_fn.train()
    _train(loss_fn, epochs=3)
    assert set(loss_fn.alpha_) == set("abcdef") and any(loss_fn.alpha_.values())
    assert all(0 <= a < 1 / (2 * 2.0) for a in loss_fn.alpha_.values())


def test_forward_update_matches_function():
    loss_fn = ASLP(warmup_epochs=0, lam=1.0)
    loss_fn.on_epoch_start(0, val_accuracy=0.8)
    x, y = _binary(b=2, ignore_frac=0.0)
    loss_fn(x, y, ids=torch.tensor([4, 9]))
    expected = LF.aslp_alpha_update(torch.zeros(2), x, y, 0.8, 2.0, 0.002, 1.0)
    np.testing.assert_allclose([loss_fn.alpha_[4], loss_fn.alpha_[9]], expected.numpy())
    torch.testing.assert_close(loss_fn.alpha([4, 9]), expected)


def test_ids_and_accuracy_are_required():
    loss_fn = ASLP(warmup_epochs=0)
    x, y = _binary(b=2)
    with pytest.raises(ValueError, match="ids"):
        loss_fn(x, y)
    with pytest.raises(ValueError, match="ids"):
        loss_fn(x, y, ids=["a"])
    with pytest.raises(TypeError, match="ids"):
        loss_fn(x, y, ids=[1.5, 2.5])
    with pytest.raises(RuntimeError, match="val_accuracy"):
        loss_fn(x, y, ids=["a", "b"])
    with pytest.raises(ValueError, match="val_accuracy"):
        loss_fn.on_epoch_start(0, val_accuracy=1.5)


def test_state_dict_round_trip_resumes_exactly():
    a = ASLP(warmup_epochs=1, eta=0.05, lam=1.0, seed=4)
    _train(a, epochs=3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ASLP(warmup_epochs=1, eta=0.05, lam=1.0, seed=999)
    b.load_state_dict(torch.load(buf))
    assert b.alpha_ == a.alpha_ and b.epoch == a.epoch and b.val_accuracy == a.val_accuracy
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 2, (3, 4, 4), generator=torch.Generator().manual_seed(3))
    seq_a = [a(x, y, ids=["a", "b", "c"]).item() for _ in range(5)]
    seq_b = [b(x, y, ids=["a", "b", "c"]).item() for _ in range(5)]
    assert seq_a == seq_b
    assert b.alpha_ == a.alpha_


# --- segcal's multi-class extension -------------------------------------------------------------------------------

def test_multiclass_with_two_classes_is_binary_aslp():
    x, y = _binary(b=3)
    logits2 = torch.cat([torch.zeros_like(x), x], dim=1)  # softmax over (0, x) = sigmoid(x)
    beta = 0.4
    for z in (torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0])):
        torch.testing.assert_close(LF.sc_ce(logits2, y, beta=2 * beta, z=z, reduction="none"),
                                   LF.sc_bce(x, y, beta=beta, z=z, reduction="none"))
    alpha = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)
    torch.testing.assert_close(
        LF.aslp_alpha_update(alpha, logits2, y, 0.8, beta=2 * beta, eta=0.01, lam=3.0, multiclass=True),
        LF.aslp_alpha_update(alpha, x, y, 0.8, beta=beta, eta=0.01, lam=3.0))


def test_multiclass_expectation_is_label_smoothing():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3, 4), generator=g)
    y[0, 0, 0] = IGN
    alpha, beta = 0.3, 1.2
    expectation = (1 - alpha) * LF.sc_ce(z, y, beta=beta, z=torch.zeros(2)) + alpha * LF.sc_ce(
        z, y, beta=beta, z=torch.ones(2))
    torch.testing.assert_close(expectation, LF.label_smoothing(z, y, epsilon=alpha * beta))
    with pytest.raises(ValueError, match="beta"):
        LF.sc_ce(z, y, beta=1.3)  # above C/(C-1) = 1.25 a perturbed target leaves the simplex


def test_multiclass_module_trains_and_bounds_alpha():
    loss_fn = ASLP(multiclass=True, warmup_epochs=0, eta=10.0, lam=0.0)
    assert loss_fn.beta == 1.0
    loss_fn.on_epoch_start(0, val_accuracy=0.5)
    z = torch.zeros(2, 4, 3, 3)
    z[:, 0] = 8.0  # confidently right: the rule raises α towards its bound
    y = torch.zeros(2, 3, 3, dtype=torch.long)
    loss = loss_fn(z, y, ids=["p", "q"])
    assert loss.shape == ()
    assert loss_fn.alpha_["p"] == pytest.approx(alpha_max(1.0, multiclass=True)) == pytest.approx(0.99)
