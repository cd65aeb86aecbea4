"""The fixed test menu for the dense losses (CE, LS, focal, ECP, SVLS, MbLS, NACL)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from losses_reference import gaussian_svls_kernel, per_pixel

from segcal.losses import (
    LOSSES,
    CrossEntropyLoss,
    EntropyPenaltyLoss,
    FocalLoss,
    LabelSmoothingLoss,
    MbLSLoss,
    NACLLoss,
    SVLSLoss,
    get_loss,
)
from segcal.losses import functional as LF
from segcal.losses._common import svls_kernel

IGN = 255

# name, function, module class, non-default kwargs exercising the maths, reference name
CASES = [
    ("ce", LF.cross_entropy, CrossEntropyLoss, {}),
    ("ls", LF.label_smoothing, LabelSmoothingLoss, {"epsilon": 0.2}),
    ("focal", LF.focal, FocalLoss, {"gamma": 2.0}),
    ("ecp", LF.entropy_penalty, EntropyPenaltyLoss, {"beta": 0.3}),
    ("svls", LF.svls, SVLSLoss, {"sigma": 1.0, "kernel_size": 3}),
    ("mbls", LF.mbls, MbLSLoss, {"margin": 1.0, "alpha": 0.5}),
    ("nacl", LF.nacl, NACLLoss, {"alpha": 0.3}),
    ("nacl-gauss-l2-probs", LF.nacl, NACLLoss,
     {"alpha": 0.7, "kernel": "gaussian", "sigma": 0.8, "distance": "l2", "on": "probs", "kernel_size": 5}),
]
IDS = [c[0] for c in CASES]

REF_DEFAULTS = {
    "ce": {}, "ls": {}, "focal": {}, "ecp": {}, "mbls": {},
    "svls": {"sigma": 1.0, "kernel_size": 3},
    "nacl": {"kernel_size": 3, "kernel": "mean", "sigma": 1.0, "distance": "l1", "on": "logits"},
}


def _ref_name(name: str) -> str:
    return name.split("-")[0]


def _data(b=2, c=4, h=5, w=6, seed=0, dtype=torch.float64, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(b, c, h, w, generator=g)).to(dtype)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < ignore_frac] = IGN
    return z, y


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
def test_smoke(name, fn, cls, kw):
    z, y = _data(dtype=torch.float32)
    z.requires_grad_(True)
    loss = cls(**kw)(z, y)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad.permute(0, 2, 3, 1)[y == IGN] == 0).all()  # ignore pixels receive no gradient


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
def test_bad_input_raises(name, fn, cls, kw):
    z, y = _data(dtype=torch.float32)
    with pytest.raises(ValueError, match="logits"):
        fn(z[0], y, **kw)
    with pytest.raises(ValueError, match="target"):
        fn(z, y[:, :-1], **kw)
    with pytest.raises(TypeError, match="target"):
        fn(z, y.float(), **kw)
    with pytest.raises(TypeError, match="logits"):
        fn(z.long(), y, **kw)
    bad = y.clone()
    bad[0, 0, 0] = 4
    with pytest.raises(ValueError, match="outside"):
        fn(z, bad, **kw)
    nan = z.clone()
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(nan, y, **kw)
    with pytest.raises(ValueError, match="reduction"):
        fn(z, y, reduction="avg", **kw)
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="avg", **kw)


@pytest.mark.parametrize(
    ("fn", "kw", "arg"),
    [(LF.label_smoothing, {"epsilon": 1.5}, "epsilon"), (LF.focal, {"gamma": -1.0}, "gamma"),
     (LF.entropy_penalty, {"beta": float("nan")}, "beta"), (LF.mbls, {"margin": -1.0}, "margin"),
     (LF.svls, {"kernel_size": 4}, "kernel_size"), (LF.svls, {"sigma": 0.0}, "sigma"),
     (LF.nacl, {"kernel": "box"}, "kernel"), (LF.nacl, {"distance": "l3"}, "distance"),
     (LF.nacl, {"on": "features"}, "on"), (LF.nacl, {"alpha": -0.1}, "alpha")],
)
def test_bad_hyperparameters_raise(fn, kw, arg):
    z, y = _data(dtype=torch.float32)
    with pytest.raises(ValueError, match=arg):
        fn(z, y, **kw)


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
def test_reductions(name, fn, cls, kw):
    z, y = _data()
    m = fn(z, y, reduction="none", **kw)
    assert m.shape == y.shape
    assert (m[y == IGN] == 0).all()
    s = fn(z, y, reduction="sum", **kw)
    mean = fn(z, y, reduction="mean", **kw)
    torch.testing.assert_close(s, m.sum())
    torch.testing.assert_close(mean, m.sum() / (y != IGN).sum())


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
def test_gradcheck(name, fn, cls, kw):
    z, y = _data(b=1, c=3, h=3, w=4, seed=3)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, y, **kw), (z,))


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_module_equals_function(name, fn, cls, kw, reduction):
    z, y = _data(dtype=torch.float32)
    torch.testing.assert_close(cls(reduction=reduction, **kw)(z, y), fn(z, y, reduction=reduction, **kw),
                               rtol=0, atol=0)


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (5, 6), (4, 1)])
def test_values_against_reference(name, fn, cls, kw, size):
    z, y = _data(b=2, c=4, h=size[0], w=size[1], seed=sum(size), ignore_frac=0.3)
    ref_kw = {**REF_DEFAULTS[_ref_name(name)], **kw}
    ref = per_pixel(_ref_name(name), z.numpy(), y.numpy(), IGN, **ref_kw)
    got = fn(z, y, reduction="none", **kw)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    n_valid = int((y != IGN).sum())
    np.testing.assert_allclose(fn(z, y, **kw).item(), ref.sum() / max(n_valid, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
def test_all_ignore_gives_zero_with_graph(name, fn, cls, kw):
    z, y = _data()
    y[:] = IGN
    z.requires_grad_(True)
    loss = fn(z, y, **kw)
    assert loss.item() == 0.0
    loss.backward()
    assert (z.grad == 0).all()


@pytest.mark.parametrize(("name", "fn", "cls", "kw"), CASES, ids=IDS)
def test_half_precision_computed_in_float32(name, fn, cls, kw):
    z, y = _data(dtype=torch.float32)
    got = fn(z.half(), y, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(z.half().float(), y, **kw))


def test_ignore_index_none_and_custom():
    z, y = _data(ignore_frac=0.0)
    torch.testing.assert_close(LF.cross_entropy(z, y, ignore_index=None), F.cross_entropy(z, y))
    y2 = y.clone()
    y2[0, 0, 0] = -1
    torch.testing.assert_close(LF.cross_entropy(z, y2, ignore_index=-1), F.cross_entropy(z, y2, ignore_index=-1))


# --- identities -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fn", "kw"),
    [(LF.label_smoothing, {"epsilon": 0.0}), (LF.focal, {"gamma": 0.0}), (LF.entropy_penalty, {"beta": 0.0}),
     (LF.mbls, {"margin": 1e6, "alpha": 0.5}), (LF.mbls, {"alpha": 0.0}), (LF.nacl, {"alpha": 0.0}),
     (LF.nacl, {"alpha": 0.0, "kernel": "gaussian", "on": "probs"})],
)
def test_reduces_to_cross_entropy(fn, kw):
    z, y = _data()
    expected = F.cross_entropy(z, y, ignore_index=IGN, reduction="none")
    torch.testing.assert_close(fn(z, y, reduction="none", **kw), expected)
    torch.testing.assert_close(fn(z, y, **kw), F.cross_entropy(z, y, ignore_index=IGN))


def test_svls_on_uniform_label_map_is_cross_entropy():
    z, _ = _data()
    y = torch.full((2, 5, 6), 2)
    y[1, 2, 3] = IGN  # ignore neighbours must not leak mass either
    torch.testing.assert_close(LF.svls(z, y, reduction="none"), F.cross_entropy(z, y, ignore_index=IGN,
                                                                                reduction="none"))


def test_focal_is_below_cross_entropy_and_ls_above_at_confident_correct():
    z = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    z[0, 1] = 5.0
    y = torch.ones(1, 1, 1, dtype=torch.long)
    ce = LF.cross_entropy(z, y)
    assert LF.focal(z, y, gamma=3.0) < ce < LF.label_smoothing(z, y, epsilon=0.1)


def test_mbls_penalty_only_above_margin():
    z = torch.tensor([[10.0, 4.0, 0.0]], dtype=torch.float64).reshape(1, 3, 1, 1)
    y = torch.zeros(1, 1, 1, dtype=torch.long)
    ce = LF.cross_entropy(z, y)
    # distances 0, 6, 10; margin 5 -> hinge 0 + 1 + 5 over 3 classes
    torch.testing.assert_close(LF.mbls(z, y, margin=5.0, alpha=0.3) - ce, torch.tensor(0.3 * 6 / 3,
                                                                                       dtype=torch.float64))


# --- kernels and the official code --------------------------------------------------------------------------------

def test_svls_kernel_values():
    k = svls_kernel(3, 1.0, dtype=torch.float64)
    assert k[1, 1].item() == pytest.approx(0.5, abs=1e-12)
    for e in (k[0, 1], k[1, 0], k[1, 2], k[2, 1]):
        assert e.item() == pytest.approx(0.0778, abs=5e-5)
    for c in (k[0, 0], k[0, 2], k[2, 0], k[2, 2]):
        assert c.item() == pytest.approx(0.0472, abs=5e-5)
    assert k.sum().item() == pytest.approx(1.0)
    np.testing.assert_allclose(svls_kernel(5, 1.5, dtype=torch.float64).numpy(), gaussian_svls_kernel(5, 1.5))
    assert svls_kernel(5, 2.0)[2, 2].item() == pytest.approx(0.5)  # true centre, not g[1, 1] as in official code


def _official_svls_loss(z: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Islam & Glocker's CELossWithSVLS_2D (3×3), transcribed."""
    ks = 3
    x_grid = torch.arange(ks).repeat(ks).view(ks, ks)
    xy = torch.stack([x_grid, x_grid.t()], dim=-1).double()
    g = 1.0 / (2 * math.pi * sigma**2) * torch.exp(-((xy - (ks - 1) / 2) ** 2).sum(-1) / (2 * sigma**2))
    g = g / g.sum()
    nsum = 1 - g[1, 1]
    g[1, 1] = nsum
    kern = g / nsum
    c = z.shape[1]
    oh = F.one_hot(y, c).permute(0, 3, 1, 2).double()
    oh = F.pad(oh, (1, 1, 1, 1), mode="replicate")
    sl = F.conv2d(oh, kern.view(1, 1, ks, ks).repeat(c, 1, 1, 1), groups=c) / kern.sum()
    return (-sl * F.log_softmax(z, dim=1)).sum(dim=1).mean()


def test_svls_equals_official_code_without_ignore():
    z, y = _data(ignore_frac=0.0, h=6, w=7)
    torch.testing.assert_close(LF.svls(z, y), _official_svls_loss(z, y))


def _official_nacl_map(z: torch.Tensor, y: torch.Tensor, ks: int, alpha: float) -> torch.Tensor:
    """Murugesan et al.'s NACLLoss ('mean' kernel, l1, logits) as a per-pixel map, transcribed."""
    bs, h, w = y.shape
    c = z.shape[1]
    umask = F.unfold(y.unsqueeze(1).double(), kernel_size=(ks, ks), padding=ks // 2)
    rmask = torch.stack([torch.sum(umask == k, 1) / ks**2 for k in range(c)], dim=1).reshape(bs, c, h, w)
    ce = F.cross_entropy(z, y, reduction="none")
    return ce + alpha * (rmask - z).abs().mean(dim=1)


@pytest.mark.parametrize("ks", [3, 5])
def test_nacl_interior_equals_official_code(ks):
    z, y = _data(ignore_frac=0.0, h=8, w=9)
    ours = LF.nacl(z, y, alpha=0.1, kernel_size=ks, reduction="none")
    official = _official_nacl_map(z, y, ks, 0.1)
    r = ks // 2
    torch.testing.assert_close(ours[:, r:-r, r:-r], official[:, r:-r, r:-r])
    # at the border the official code counts padding as class 0: differs wherever the true label is not 0
    assert not torch.allclose(ours[:, 0], official[:, 0])


def test_nacl_border_proportions_sum_to_one():
    z = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    y = torch.tensor([[[1, 1], [1, IGN]]])
    # every valid pixel's in-image valid window is all class 1 -> tau = (0, 1); penalty = mean(|0-0|, |0-1|) = 0.5
    m = LF.nacl(z, y, alpha=1.0, reduction="none")
    np.testing.assert_allclose(m.numpy(), np.array([[[math.log(2) + 0.5] * 2, [math.log(2) + 0.5, 0.0]]]))


# --- registry -------------------------------------------------------------------------------------------------------

def test_registry():
    assert set(LOSSES) == {"ce", "ls", "focal", "ecp", "svls", "mbls", "nacl", "aslp"}
    assert isinstance(get_loss("NACL", alpha=0.2, kernel="gaussian"), NACLLoss)
    assert get_loss("aslp").needs_ids
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("dice")
    with pytest.raises(TypeError, match="mbls"):
        get_loss("mbls", gamma=2)
