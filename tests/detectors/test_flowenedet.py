"""FlowEneDet: flow invertibility and log-det, ActNorm init, fitting, persistence, determinism, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from segcal.detectors import FlowEneDet, NotFittedError, fit_sml_statistics, get_detector, load_pretrained, msp
from segcal.detectors.flowenedet import ActNorm, EnergyFlow, channel_group_pool, flow_input

from ._synthetic import as_batches, synthetic


@pytest.fixture(scope="module")
def data():
    return as_batches(*synthetic(12, 0), bs=2), synthetic(6, 1)


def random_flow(cond_channels: int = 3, seed: int = 0, downsample: int = 1) -> EnergyFlow:
    flow = EnergyFlow(n_blocks=3, cond_channels=cond_channels, hidden=5, dropout=0.2, seed=seed,
                      downsample=downsample).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # leave the zero-initialised start so every coupling is non-trivial
        for p in flow.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow.eval()


@pytest.mark.parametrize(("cond_channels", "downsample"), [(0, 1), (3, 1), (3, 4)])
def test_flow_inverse_of_forward_is_identity(cond_channels, downsample):
    flow = random_flow(cond_channels, downsample=downsample)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 9, 11, generator=g, dtype=torch.float64)
    ch, cw = -(-9 // downsample), -(-11 // downsample)
    cond = torch.randn(2, 3, ch, cw, generator=g, dtype=torch.float64) if cond_channels else None
    v, _ = flow(x, cond)
    assert not torch.allclose(v, x, atol=1e-3)
    torch.testing.assert_close(flow.inverse(v, cond), x, atol=1e-10, rtol=0)


# 3×3 exercises the replicate-padding fallback; downsample=2 the low-resolution conditioner
@pytest.mark.parametrize(("hw", "downsample"), [((3, 3), 1), ((4, 5), 1), ((5, 6), 2)])
def test_flow_logdet_matches_autograd_jacobian(hw, downsample):
    flow = random_flow(2, downsample=downsample)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, *hw, generator=g, dtype=torch.float64)
    cond = torch.randn(1, 2, *(-(-k // downsample) for k in hw), generator=g, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: flow(t.view_as(x), cond)[0].flatten(), x.flatten())
    _, logdet = flow(x, cond)
    torch.testing.assert_close(logdet.sum(), torch.linalg.slogdet(jac)[1], atol=1e-9, rtol=0)


def test_actnorm_data_initialisation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1) + 7
    norm = ActNorm(3).train()
    y, logdet = norm(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert logdet.shape == (4, 5, 6)
    torch.testing.assert_close(logdet[0, 0, 0], -x.std((0, 2, 3), unbiased=False).log().sum(), atol=1e-4, rtol=0)
    before = norm.bias.detach().clone()
    norm(x * 3)  # initialised once only
    torch.testing.assert_close(norm.bias.detach(), before)
    fresh = ActNorm(3).eval()
    torch.testing.assert_close(fresh(x)[0], x)  # no data init outside training
    torch.testing.assert_close(norm.inverse(norm(x)[0]), x, atol=1e-5, rtol=0)


def test_flow_input_formula_and_stability():
    z, y, _ = synthetic(2, 0)
    stats = fit_sml_statistics([(z, y)])
    u = flow_input(z, stats).double()
    zs = (z.double() - stats.class_mean_.view(1, -1, 1, 1)) / stats.class_std_.view(1, -1, 1, 1)
    p = torch.sigmoid(zs.logsumexp(1))  # σ(−E)
    torch.testing.assert_close(u[:, 0], p.log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u[:, 1], (1 - p + 1e-6).log(), atol=1e-5, rtol=1e-5)
    extreme = flow_input(torch.tensor([1e4, -1e4, -1e4, 1e4]).view(2, 2, 1, 1).repeat(1, 1, 1, 1), stats_two())
    assert torch.isfinite(extreme).all()
    assert extreme[:, 1].min() >= math.log(1e-6) - 1e-4


def stats_two():
    z = torch.tensor([[3.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2).repeat(1, 1, 2, 2)
    return fit_sml_statistics([(z, z.argmax(1))])


def test_channel_group_pool():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 64, 3, 4, generator=g)
    torch.testing.assert_close(channel_group_pool(f, 32), f.view(2, 32, 2, 3, 4).mean(2))
    small = torch.randn(2, 8, 3, 4, generator=g)
    assert channel_group_pool(small, 32) is small
    odd = torch.randn(2, 45, 3, 4, generator=g)
    ref = F.adaptive_avg_pool1d(odd.permute(0, 2, 3, 1).reshape(-1, 1, 45), 32).view(2, 3, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(channel_group_pool(odd, 32), ref)


def idm_auroc(score, z, y):
    valid = y != 255
    pos = (z.argmax(1) != y) & valid
    return roc_auc_score(pos[valid].numpy(), score[valid].numpy())


@pytest.mark.parametrize("variant", ["u", "c"])
def test_fit_converges_and_beats_msp(data, variant):
    batches, (zt, yt, ft) = data
    # score at full resolution: this data's errors are isolated pixels, which the default coarse score (4×4 blocks)
    # cannot localise (see test_flowenedet_stride.py for the coarse path)
    det = FlowEneDet(variant=variant, epochs=4, warmup_steps=3, seed=0, score_stride=1).fit(batches)
    assert det.history_[-1] < det.history_[0] - 0.05, det.history_
    s = det.score(zt, ft)
    assert s.shape == yt.shape and s.dtype == torch.float32
    assert ((s >= 0) & (s <= 1)).all()
    assert det.cond_channels_ == (8 if variant == "c" else 0)  # 8 feature channels < 32: kept as they are
    assert idm_auroc(s, zt, yt) > idm_auroc(msp(zt), zt, yt) + 0.1


def test_void_as_ood_targets_and_weights():
    z, y, _f = synthetic(2, 4)
    det = FlowEneDet()
    det.sml_ = fit_sml_statistics([(z, y)])
    void, err = y == 255, (z.argmax(1) != y) & (y != 255)
    _, _, t, w = det._prepare(z, y, None, fitting=True)
    assert (t[void] == 1).all() and (w == 1).all() and (t[~void] == err[~void].float()).all()
    det.void_as_ood = False
    _, _, t, w = det._prepare(z, y, None, fitting=True)
    assert (w[void] == 0).all() and (w[~void] == 1).all() and (t[~void] == err[~void].float()).all()


def test_void_as_ood_end_to_end_with_an_informative_condition():
    z, y, _ = synthetic(8, 4)
    void = (y == 255).float().unsqueeze(1)
    f = torch.cat([void, torch.zeros_like(void)], 1)  # a feature that marks void pixels
    batches = as_batches(z, y, f, bs=2)
    kw = dict(variant="c", epochs=8, warmup_steps=2, lr=1e-2, decay_epochs=(), downsample=1, hidden_channels=16)
    on = FlowEneDet(void_as_ood=True, **kw).fit(batches).score(z, f)
    off = FlowEneDet(void_as_ood=False, **kw).fit(batches).score(z, f)
    m = void[:, 0].bool()
    assert on[m].mean() > off[m].mean() + 0.2


def test_save_load_round_trip_and_determinism(data, tmp_path):
    batches, (zt, _yt, ft) = data
    kw = dict(variant="c", epochs=1, warmup_steps=2, seed=7, patch_size=8, patches_per_image=2, max_pixels=300)
    seen = []
    a = FlowEneDet(**kw).fit(batches, callback=seen.append)
    assert [d["step"] for d in seen] == list(range(1, len(batches) + 1)) and seen[0]["lr"] == pytest.approx(5e-4)
    b = FlowEneDet(**kw).fit(lambda: iter(batches))
    c = FlowEneDet(**{**kw, "seed": 8}).fit(batches)
    sa = a.score(zt, ft)
    torch.testing.assert_close(b.score(zt, ft), sa, atol=0, rtol=0)
    assert not torch.allclose(c.score(zt, ft), sa)
    path = tmp_path / "fed.pt"
    a.save(path)
    assert path.stat().st_size < 300_000
    loaded = FlowEneDet.load(path)
    torch.testing.assert_close(loaded.score(zt, ft), sa, atol=0, rtol=0)
    assert loaded.history_ == a.history_ and loaded.variant == "c"
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a valid saved segcal method"):
        FlowEneDet.load(tmp_path / "other.pt")


@pytest.mark.parametrize("downsample", [1, 4])
def test_any_input_size_scores_at_the_logits_resolution(data, downsample):
    batches, _ = data
    det = FlowEneDet(variant="c", epochs=1, downsample=downsample, warmup_steps=1, patch_size=10).fit(batches)
    z = torch.randn(2, 3, 15, 17)
    assert det.score(z, torch.randn(2, 8, 8, 9)).shape == (2, 15, 17)


def test_bad_inputs(data):
    batches, (zt, yt, ft) = data
    with pytest.raises(ValueError, match="variant"):
        FlowEneDet(variant="x")
    with pytest.raises(ValueError, match="n_blocks"):
        FlowEneDet(n_blocks=0)
    with pytest.raises(NotFittedError, match="not fitted"):
        FlowEneDet().score(zt)
    with pytest.raises(TypeError, match="one-shot iterator"):
        FlowEneDet(epochs=2).fit(iter(batches))
    with pytest.raises(ValueError, match="needs `features`"):
        FlowEneDet(variant="c").fit([(b["logits"], b["target"]) for b in batches])
    with pytest.raises(ValueError, match="empty"):
        FlowEneDet(epochs=1, sml=fit_sml_statistics(batches)).fit([])
    with pytest.raises(ValueError, match="labels outside"):
        FlowEneDet(epochs=1).fit([(zt, yt.clamp(max=100) + 3)])
    det = FlowEneDet(variant="c", epochs=1, warmup_steps=1).fit(batches)
    with pytest.raises(ValueError, match="C=4"):
        det.score(torch.randn(1, 4, 5, 5), ft[:1])
    with pytest.raises(ValueError, match="batch size"):
        det.score(zt, ft[:1])
    with pytest.raises(ValueError, match="F=5"):
        det.score(zt, ft[:, :5])
    with pytest.raises(ValueError, match="NaN"):
        det.score(zt, ft * float("nan"))


def test_registry_and_pretrained_lookup():
    det = get_detector("flowenedet-c", n_blocks=2)
    assert isinstance(det, FlowEneDet) and det.variant == "c" and det.n_blocks == 2
    with pytest.raises(FileNotFoundError, match="no shipped FlowEneDet"):
        load_pretrained("no-such-model")
    assert get_detector("flowenedet-c").needs_features and not get_detector("flowenedet-u").needs_features
    assert type(get_detector("flowenedet-u")).pretrained("no-such-model") is None
    assert type(get_detector("flowenedet-u")).pretrained("espnet-camvid").variant == "u"


@pytest.mark.parametrize("downsample", [1, 2])
def test_fused_inference_path_equals_log_likelihood_difference(downsample):
    flow = random_flow(3, downsample=downsample)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 2, 8, 10, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 3, 8 // downsample, 10 // downsample, generator=g, dtype=torch.float64)
    ll = flow.class_log_likelihoods(u, cond)
    torch.testing.assert_close(flow.error_logit(u, cond), ll[:, 1] - ll[:, 0], atol=1e-10, rtol=0)
    torch.testing.assert_close(flow.transform(u, cond), flow(u, cond)[0], atol=1e-12, rtol=0)
