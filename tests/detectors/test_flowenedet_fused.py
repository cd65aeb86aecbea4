"""FlowEneDet's fused inference path (``score_stride > 1``) against the straightforward cat-based code it replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segcal.detectors import FlowEneDet
from segcal.detectors.flowenedet import (
    EnergyFlow,
    _bilinear_resize,
    _fast_flow_input,
    _group_matrix,
    _logsumexp_ch,
    box_pool,
    channel_group_pool,
    flow_input,
    low_res,
)

from ._synthetic import as_batches, synthetic


def _reference_score(det: FlowEneDet, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """The coarse path as it was before the fused inference: pooled logits → flow_input → channel-group pooling and
    bilinear resize of the features → CondNorm and torch.cat([x_keep, cond]) in every coupling (error_logit)."""
    r = det.downsample if det.score_stride is None else det.score_stride
    _n, _, h, w = logits.shape
    coarse = low_res((h, w), r)
    inner = max(1, det.downsample // r)
    u = flow_input(box_pool(logits.float(), r), det.sml_, det.inputs)
    cond = None
    if det.needs_features:
        cond = channel_group_pool(features.float(), det.cond_channels)
        cond = F.interpolate(cond, size=low_res(coarse, inner), mode="bilinear", align_corners=False)
    with torch.no_grad():
        s = torch.sigmoid(det.net_.error_logit(u, cond, inner))
    return F.interpolate(s.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)


def _randomise(det: FlowEneDet, seed: int) -> FlowEneDet:
    """Every flow parameter and CondNorm statistic random (a one-epoch fit leaves the zero-initialised output convs near
    zero, where a wrong coupling would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in det.net_.named_parameters():
            if name not in ("means", "log_stds"):  # (the output Gaussians as fitted: scores away from 0 and 1)
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
        if det.net_.cond_norm is not None:
            det.net_.cond_norm.mean.copy_(torch.randn(det.net_.cond_norm.mean.shape, generator=g))
            det.net_.cond_norm.inv_std.copy_(0.5 + torch.rand(det.net_.cond_norm.inv_std.shape, generator=g))
    return det


@pytest.fixture(scope="module", params=[("u", 32, 4, "energy"), ("c", 32, 4, "energy"), ("c", 3, 4, "energy+msp"),
                                        ("c", 4, 2, "energy"), ("u", 32, 2, "energy+msp")],
                ids=["u-d4", "c-d4", "c-group3-d4-msp", "c-group4-d2", "u-d2-msp"])
def fitted(request):
    """Detectors on 8-channel features: ``cond_channels`` 32 (no pooling) or 3 / 4 (channel-group pooling)."""
    variant, cond_channels, downsample, inputs = request.param
    batches = as_batches(*synthetic(4, 0), bs=2)
    det = FlowEneDet(variant=variant, epochs=1, warmup_steps=1, n_blocks=4, hidden_channels=6, seed=1,
                     cond_channels=cond_channels, downsample=downsample, inputs=inputs).fit(batches)
    return _randomise(det, 7)


def _inputs(n: int, hw: tuple[int, int], fhw: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *hw, generator=g) * 4, torch.randn(n, 8, *fhw, generator=g) * 2 + 0.5


@pytest.mark.parametrize("stride", [2, 3, 8, None])
@pytest.mark.parametrize(("hw", "fhw"), [((24, 32), (12, 16)),   # features at 1/2: the strided-slice resize
                                         ((24, 32), (24, 32)),   # features at full resolution (ratio up to 8)
                                         ((24, 36), (24, 12)),   # different integer ratios per side
                                         ((15, 17), (8, 9)),     # ragged sizes: interpolation fallback
                                         ((5, 7), (3, 4))])      # tiny maps: replicate padding
def test_fused_score_equals_the_cat_based_reference(fitted, stride, hw, fhw):
    det = fitted
    z, f = _inputs(2, hw, fhw)
    det.score_stride = stride
    try:
        got, want = det.score(z, f), _reference_score(det, z, f)
    finally:
        det.score_stride = None
    assert got.shape == want.shape == (2, *hw)
    # the scores spread, and (FED-C) depend on the features, far above the tolerance: a wrong fold would show
    assert want.std() > 2e-3
    if det.needs_features:
        assert (_reference_score(det, z, f.flip(-1)) - want).abs().max() > 2e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_stride_one_still_uses_the_exact_full_resolution_path(fitted):
    det = fitted
    z, f = _inputs(2, (16, 24), (8, 12), seed=3)
    det.score_stride = 1
    try:
        u = flow_input(z, det.sml_, det.inputs)
        cond = det._condition(f, 2, low_res(z.shape[-2:], det.downsample), fitting=False)
        with torch.no_grad():
            want = torch.sigmoid(det.net_.error_logit(u, cond))
        torch.testing.assert_close(det.score(z, f), want, atol=0, rtol=0)
    finally:
        det.score_stride = None


@pytest.mark.parametrize(("cond_channels", "downsample", "group"), [(0, 1, False), (3, 1, False), (3, 2, False),
                                                                   (3, 1, True), (3, 3, True)])
def test_fused_error_logit_is_error_logit_in_float64(cond_channels, downsample, group):
    """The algebra (folded CondNorm / group pooling / cond columns, moved padding, folded −1/2, sigmoid(−r) for
    exp(−softplus r), 2×2 affine steps) is exact: float64 agrees to 1e-10."""
    flow = EnergyFlow(n_blocks=3, cond_channels=cond_channels, hidden=5, dropout=0.2, seed=0,
                      downsample=downsample).double().eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if flow.cond_norm is not None:
            flow.cond_norm.mean.normal_(generator=g)
            flow.cond_norm.inv_std.uniform_(0.5, 2.0, generator=g)
    u = torch.randn(2, 2, 13, 18, generator=g, dtype=torch.float64)
    low = low_res((13, 18), downsample)
    feats = torch.randn(2, 7 if group else cond_channels, *low, generator=g, dtype=torch.float64) if cond_channels \
        else None
    m = _group_matrix(7, cond_channels, u) if group else None
    cond = None if feats is None else channel_group_pool(feats, cond_channels)
    with torch.no_grad():
        want = flow.error_logit(u, cond)
        got = flow.fused_error_logit(u.clone(), feats, m, downsample)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_fused_error_logit_leaves_its_input_untouched():
    flow = EnergyFlow(n_blocks=2, cond_channels=0, hidden=4, dropout=0.0, seed=0).eval()
    u = torch.randn(1, 2, 6, 6)
    before = u.clone()
    with torch.no_grad():
        flow.fused_error_logit(u)
    assert torch.equal(u, before)


@pytest.mark.parametrize(("src", "dst"), [((12, 16), (6, 8)), ((12, 16), (4, 4)), ((12, 16), (3, 2)),
                                          ((12, 16), (12, 8)), ((12, 16), (12, 16)), ((13, 16), (6, 8)),
                                          ((6, 8), (12, 16)), ((7, 9), (7, 3))])
def test_bilinear_resize_equals_interpolate(src, dst):
    x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    torch.testing.assert_close(_bilinear_resize(x, dst), want, atol=1e-6, rtol=0)


def test_logsumexp_without_subnormals_equals_logsumexp():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 11, 9, 10, generator=g) * 60  # many terms e^(z − max) far below the float32 normal range
    z[:, 3] = -1e4
    torch.testing.assert_close(_logsumexp_ch(z), z.logsumexp(dim=1, keepdim=True), atol=0, rtol=1e-6)
    z64 = z.double()
    torch.testing.assert_close(_logsumexp_ch(z64), z64.logsumexp(dim=1, keepdim=True), atol=1e-12, rtol=0)


@pytest.mark.parametrize("inputs", ["energy", "energy+msp"])
def test_fast_flow_input_equals_flow_input(inputs):
    z, _y, _ = synthetic(3, 0)
    det = FlowEneDet(epochs=1, warmup_steps=1, n_blocks=1).fit(as_batches(*synthetic(2, 1)))
    z = z * 3
    got = _fast_flow_input(z * 16, 1 / 16, det.sml_, inputs)
    torch.testing.assert_close(got, flow_input(z, det.sml_, inputs), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="inputs"):
        _fast_flow_input(z, 1.0, det.sml_, "msp")


@pytest.mark.parametrize("variant", ["u", "c"])
def test_shipped_fits_score_as_before(variant):
    det = type(FlowEneDet(variant=variant)).pretrained("espnet-camvid")
    if det is None:
        pytest.skip("no shipped espnet-camvid FlowEneDet")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, det.num_classes_, 48, 64, generator=g) * 3
    f = torch.randn(1, max(det.feature_channels_, 1), 24, 32, generator=g) if det.needs_features else None
    for stride in (None, 2):
        det.score_stride = stride
        try:
            torch.testing.assert_close(det.score(z, f), _reference_score(det, z, f), atol=1e-5, rtol=0)
        finally:
            det.score_stride = None
