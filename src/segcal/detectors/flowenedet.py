"""FlowEneDet: a normalizing flow on the free energy of a frozen segmenter, trained to flag errors and OOD pixels.

Why our own flow (~150 lines) instead of a library: the three flow packages in the environment were checked.
zuko and normflows build flows over flat vectors (their couplings' conditioners are MLPs on a vector), so a per-pixel
coupling whose conditioner is a 7×7 convolution over the neighbourhood of the *masked* channel plus a spatial condition
map does not fit them without reshaping everything into patches. FrEIA can express convolutional conditional couplings
(``GLOWCouplingBlock`` with a conv ``subnet_constructor`` and ``cond``), but its affine blocks fix the scale
parametrisation to a soft-clamped ``exp`` (we need ``log s = −softplus(·)`` as in the paper), it would become a new
runtime dependency of the package (last release 2022) for four small layers, and its graph API makes per-pixel
log-determinants (we need one per pixel, not one per image) awkward. The few layers below are tested for
invertibility and against the autograd Jacobian instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcal._checks import check_dense_scores, check_finite, check_target, check_tensor
from segcal._estimator import FORMAT
from segcal.detectors._base import Detector
from segcal.detectors._batches import BatchSource, check_source, from_store, iterate
from segcal.detectors.sml import SMLStatistics, fit_sml_statistics

_LEGACY_FORMAT = "segcal.FlowEneDet"
_LOG_2PI = math.log(2 * math.pi)


def flow_input(logits: Tensor, stats: SMLStatistics, inputs: str = "energy") -> Tensor:
    r"""The 2-channel energy input of FlowEneDet.

    .. math:: \check z_c = (z_c-\mu_c)/\sigma_c,\quad E = -\log\sum_c e^{\check z_c},\quad
              u = \big[\log\sigma(-E),\ \log(1-\sigma(-E)+10^{-6})\big]

    computed stably as ``log σ(a) = −softplus(−a)`` and ``log(σ(−a) + 1e−6) = logaddexp(−softplus(a), log 1e−6)``.

    ``inputs="energy+msp"`` (an optional extension, *not* the paper's method) replaces the second channel — a
    deterministic function of the first, so the faithful input is really one-dimensional — by the log maximum
    softmax probability of the raw logits, ``log p_max = max_c z_c − logsumexp_c z_c``: the top-1/top-2 margin that
    makes MSP a strong misclassification score is otherwise absent from ``u``.

    Shape:
        logits ``(N, C, H, W)`` → ``(N, 2, H, W)`` float32 (float64 kept).
    """
    a = stats.standardize(logits).logsumexp(dim=1, keepdim=True)  # a = −E
    log_in = -F.softplus(-a)
    if inputs == "energy+msp":
        return torch.cat([log_in, logits.amax(dim=1, keepdim=True) - logits.logsumexp(dim=1, keepdim=True)], dim=1)
    if inputs != "energy":
        raise ValueError(f"`inputs` must be 'energy' or 'energy+msp', got {inputs!r}")
    log_out = torch.logaddexp(-F.softplus(a), torch.full_like(a, math.log(1e-6)))
    return torch.cat([log_in, log_out], dim=1)


def low_res(size: tuple[int, int] | torch.Size, factor: int) -> tuple[int, int]:
    """``(ceil(H / factor), ceil(W / factor))``: the conditioners' resolution."""
    return -(-int(size[0]) // factor), -(-int(size[1]) // factor)


def box_pool(x: Tensor, factor: int) -> Tensor:
    """Average ``factor × factor`` blocks: ``adaptive_avg_pool2d(x, low_res(x.shape[-2:], factor))``.

    When both sides are multiples of ``factor`` the blocks are summed from strided slices (rows first), several
    times faster on CPU than the pooling kernels on an NCHW map with many channels; equal to them to float rounding.
    """
    h, w = x.shape[-2:]
    if factor == 1:
        return x
    if h % factor or w % factor:
        return F.adaptive_avg_pool2d(x, low_res((h, w), factor))
    return _box_sum(x, factor) * (1.0 / factor**2)


def _box_sum(x: Tensor, factor: int) -> Tensor:
    """Sums of ``factor × factor`` blocks (sides multiples of ``factor``), rows first, accumulated in place."""
    rows = x[..., 0::factor, :] + x[..., 1::factor, :]
    for i in range(2, factor):
        rows += x[..., i::factor, :]
    out = rows[..., 0::factor] + rows[..., 1::factor]
    for j in range(2, factor):
        out += rows[..., j::factor]
    return out


def channel_group_pool(features: Tensor, n_out: int) -> Tensor:
    """Average contiguous channel groups down to ``n_out`` channels (``adaptive_avg_pool1d`` bins over channels).

    Feature maps with ``F <= n_out`` channels are returned unchanged.
    """
    w = _group_matrix(features.shape[1], n_out, features)
    return features if w is None else torch.einsum("of,bfhw->bohw", w, features)


def _group_matrix(f: int, n_out: int, like: Tensor) -> Tensor | None:
    """The ``(n_out, f)`` averaging matrix of :func:`channel_group_pool`; ``None`` when it returns its input."""
    if f <= n_out:
        return None
    w = torch.zeros(n_out, f, dtype=like.dtype, device=like.device)
    for i in range(n_out):
        lo, hi = (i * f) // n_out, -((-(i + 1) * f) // n_out)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def _bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, from strided slices where a side shrinks by
    an integer factor ``k``: the bilinear sample of output ``i`` then sits at input ``k·i + (k−1)/2``, i.e. one pixel
    (``k`` odd) or the mean of two (``k`` even) — the same values, several times cheaper than the kernel."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h % size[0] or w % size[1]:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    for dim, k in ((-2, h // size[0]), (-1, w // size[1])):
        if k == 1:
            continue
        first = [slice(None)] * x.ndim
        first[dim] = slice((k - 1) // 2, None, k)
        if k % 2:
            x = x[tuple(first)]
        else:
            second = list(first)
            second[dim] = slice(k // 2, None, k)
            x = (x[tuple(first)] + x[tuple(second)]).mul_(0.5)
    return x


def _logsumexp_ch(z: Tensor) -> Tensor:
    """``z.logsumexp(dim=1, keepdim=True)`` with the exponents floored at −87: a term below ``e^−87`` cannot change a
    float32 sum that contains ``e^0 = 1``, and the floor keeps ``exp`` off subnormal results, which cost ~40× more on
    CPU (``exp`` of the standardised logits was 1.7 of FED-U's 17 ms)."""
    m = z.amax(dim=1, keepdim=True)
    return (z - m).clamp_min_(-87.0).exp_().sum(dim=1, keepdim=True).log_().add_(m)


def _fast_flow_input(pooled_sum: Tensor, scale: float, stats: SMLStatistics, inputs: str) -> Tensor:
    """:func:`flow_input` of ``pooled_sum · scale`` (box-pooled logits before their ``1/r²``), the scale folded into
    the standardisation and the logsumexps of :func:`_logsumexp_ch` — inference only; equal to float32 rounding."""
    if inputs not in ("energy", "energy+msp"):
        raise ValueError(f"`inputs` must be 'energy' or 'energy+msp', got {inputs!r}")
    mean = stats.class_mean_.view(1, -1, 1, 1)
    inv = (1.0 / stats.class_std_).view(1, -1, 1, 1)
    a = _logsumexp_ch(torch.addcmul((-mean * inv).to(pooled_sum), pooled_sum, (inv * scale).to(pooled_sum)))
    log_in = -F.softplus(-a)
    if inputs == "energy+msp":
        z = pooled_sum * scale
        return torch.cat([log_in, z.amax(dim=1, keepdim=True) - _logsumexp_ch(z)], dim=1)
    log_out = torch.logaddexp(-F.softplus(a), torch.full_like(a, math.log(1e-6)))
    return torch.cat([log_in, log_out], dim=1)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + b)·exp(log_s)``, data-initialised to zero mean / unit variance on the first
    training batch (Glow)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._init(x)
        return (x + self.bias) * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0], *x.shape[2:])

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.log_scale).exp() - self.bias


class CondNorm(nn.Module):
    """Fixed per-channel standardisation of the condition, estimated on the first training batch.

    Not learnable on purpose: decoder features often contain (near-)constant channels, and a learnable ActNorm with a
    ``1/std`` scale lets a tiny drift of its bias blow such a channel up and saturate the coupling's sigmoid. The
    standard deviation is floored at 1e-2 for the same reason.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("inv_std", torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.mean.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
                self.inv_std.copy_(1.0 / x.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-2))
                self.initialized.fill_(True)
        return (x - self.mean) * self.inv_std


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution (a learned ``c×c`` mixing matrix, initialised to a random rotation)."""

    def __init__(self, channels: int, generator: torch.Generator) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        self.weight = nn.Parameter(q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = torch.linalg.slogdet(self.weight)[1]
        return torch.einsum("ij,bjhw->bihw", self.weight, x), logdet.expand(x.shape[0], *x.shape[2:])

    def inverse(self, y: Tensor) -> Tensor:
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight), y)


class AffineCoupling(nn.Module):
    """Affine coupling on 2 channels: channel ``keep`` conditions the other, ``y = x·s + t``, ``log s = −softplus``.

    Conditioner on ``[x_keep, condition]``: 1×1 conv → sigmoid → 7×7 conv (reflect pad) → sigmoid → Dropout2d →
    1×1 conv (zero-initialised, so every block starts as a fixed contraction by 1/2 and a zero shift).

    With ``downsample = d > 1`` the conditioner sees ``x_keep`` average-pooled by ``d`` (the condition must already be
    at that size) and its ``(log s, t)`` maps are bilinearly upsampled back. They remain functions of ``x_keep``
    only, so the coupling stays exactly invertible with a triangular Jacobian, while the transform itself, its
    log-determinant and hence the score keep the full resolution; only the costly 7×7 context runs at ``1/d²`` of
    the pixels.
    """

    def __init__(self, keep: int, cond_channels: int, hidden: int, dropout: float, downsample: int = 1) -> None:
        super().__init__()
        self.keep = keep
        self.downsample = downsample
        self.inp = nn.Conv2d(1 + cond_channels, hidden, 1)
        self.mid = nn.Conv2d(hidden, hidden, 7)
        self.drop = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(hidden, 2, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _log_s_t(self, xk: Tensor, cond: Tensor | None, downsample: int | None = None) -> tuple[Tensor, Tensor]:
        size = xk.shape[-2:]
        d = self.downsample if downsample is None else downsample
        if d > 1:
            xk = F.adaptive_avg_pool2d(xk, low_res(size, d))
        # sigmoid − 1/2: the same function class as sigmoid (a conv bias absorbs the offset), but with all-positive
        # inputs Adam moves the 49·hidden weights of the 7×7 conv coherently and saturates it within ~50 steps
        h = torch.sigmoid(self.inp(xk if cond is None else torch.cat([xk, cond], dim=1))) - 0.5
        # reflect padding needs a side > 3; tiny maps (tests, thumbnails) fall back to replicate
        mode = "reflect" if min(h.shape[-2:]) > 3 else "replicate"
        h = self.drop(torch.sigmoid(self.mid(F.pad(h, (3, 3, 3, 3), mode=mode))) - 0.5)
        raw = self.out(h)
        if raw.shape[-2:] != size:
            raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        return -F.softplus(raw[:, :1]), raw[:, 1:]

    def forward(self, x: Tensor, cond: Tensor | None, with_logdet: bool = True, downsample: int | None = None) -> Any:
        """``downsample`` overrides the conditioner's pooling factor (``None``: the one it was built with) — used by
        the coarse scoring path, whose input is already pooled."""
        xk, xc = x[:, self.keep : self.keep + 1], x[:, 1 - self.keep : 2 - self.keep]
        log_s, t = self._log_s_t(xk, cond, downsample)
        yc = torch.addcmul(t, xc, log_s.exp())
        y = torch.cat([xk, yc] if self.keep == 0 else [yc, xk], dim=1)
        return (y, log_s[:, 0]) if with_logdet else y

    def inverse(self, y: Tensor, cond: Tensor | None) -> Tensor:
        yk, yc = y[:, self.keep : self.keep + 1], y[:, 1 - self.keep : 2 - self.keep]
        log_s, t = self._log_s_t(yk, cond)
        xc = (yc - t) * (-log_s).exp()
        return torch.cat([yk, xc] if self.keep == 0 else [xc, yk], dim=1)


class EnergyFlow(nn.Module):
    """``L`` blocks of ActNorm → invertible 1×1 conv → affine coupling (alternating the kept channel), with a
    data-initialised standardisation of the condition and two class-conditional diagonal Gaussians in the output
    space."""

    def __init__(self, *, n_blocks: int, cond_channels: int, hidden: int, dropout: float, seed: int,
                 downsample: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cond_norm = CondNorm(cond_channels) if cond_channels else None
        self.norms = nn.ModuleList(ActNorm(2) for _ in range(n_blocks))
        self.convs = nn.ModuleList(InvConv1x1(2, g) for _ in range(n_blocks))
        self.couplings = nn.ModuleList(AffineCoupling(i % 2, cond_channels, hidden, dropout, downsample)
                                       for i in range(n_blocks))
        # row 0: "correct", row 1: "misclassified / OOD"; in-distribution pixels have a larger log σ(−E) (channel 0)
        self.means = nn.Parameter(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        self.log_stds = nn.Parameter(torch.zeros(2, 2))

    def _cond(self, cond: Tensor | None) -> Tensor | None:
        return None if cond is None or self.cond_norm is None else self.cond_norm(cond)

    def forward(self, u: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``u (N,2,H,W)`` → ``(v, log|det ∂v/∂u|)`` with a per-pixel log-determinant ``(N,H,W)``."""
        c = self._cond(cond)
        logdet = u.new_zeros(u.shape[0], *u.shape[2:])
        for norm, conv, coupling in zip(self.norms, self.convs, self.couplings):
            for step in (norm, conv):
                u, ld = step(u)
                logdet = logdet + ld
            u, ld = coupling(u, c)
            logdet = logdet + ld
        return u, logdet

    def inverse(self, v: Tensor, cond: Tensor | None = None) -> Tensor:
        c = self._cond(cond)
        for norm, conv, coupling in zip(reversed(self.norms), reversed(self.convs), reversed(self.couplings)):
            v = norm.inverse(conv.inverse(coupling.inverse(v, c)))
        return v

    def transform(self, u: Tensor, cond: Tensor | None = None, downsample: int | None = None) -> Tensor:
        """``v = f(u; c)`` without log-determinants, each ActNorm + 1×1 conv fused into one per-pixel affine map —
        the full-resolution inference path, ``score_stride=1`` (the coarse one uses :meth:`fused_error_logit`).
        ``downsample`` overrides the couplings' conditioner pooling factor (see :meth:`AffineCoupling.forward`)."""
        c = self._cond(cond)
        for norm, conv, coupling in zip(self.norms, self.convs, self.couplings):
            scale = norm.log_scale.exp().view(-1)
            weight = conv.weight * scale  # W · diag(s)
            bias = conv.weight @ (norm.bias.view(-1) * scale)
            u = coupling(F.conv2d(u, weight[:, :, None, None], bias), c, with_logdet=False, downsample=downsample)
        return u

    def error_logit(self, u: Tensor, cond: Tensor | None = None, downsample: int | None = None) -> Tensor:
        """``log N(v; μ₁, σ₁) − log N(v; μ₀, σ₀)`` per pixel ``(N, H, W)`` (log-determinants cancel), written as
        the quadratic ``Σ_d (a_d v_d + b_d) v_d + c``; equals the difference of :meth:`class_log_likelihoods`."""
        v = self.transform(u, cond, downsample)
        p0, p1 = (-2 * self.log_stds[0]).exp(), (-2 * self.log_stds[1]).exp()  # precisions
        a = 0.5 * (p0 - p1)
        b = self.means[1] * p1 - self.means[0] * p0
        c = (0.5 * (self.means[0] ** 2 * p0 - self.means[1] ** 2 * p1) + self.log_stds[0] - self.log_stds[1]).sum()
        return ((a.view(1, 2, 1, 1) * v + b.view(1, 2, 1, 1)) * v).sum(dim=1) + c

    def fused_error_logit(self, u: Tensor, features: Tensor | None = None, group: Tensor | None = None,
                          downsample: int = 1) -> Tensor:
        """:meth:`error_logit` for inference, rearranged for speed; equal to it to float32 rounding (tested).

        ``features`` are the condition *before* :class:`CondNorm` and before channel-group pooling, already resized
        to the conditioners' grid (``low_res(u.shape[-2:], downsample)``); ``group`` is the ``(cond_channels, F)``
        channel-group matrix (``None``: no pooling). Every step the conditioners apply to the condition is linear
        per pixel — group pooling, CondNorm, the condition columns of each coupling's first 1×1 conv — so they fold
        into one ``F → n_blocks·hidden`` matrix applied once per call (no concatenation, nothing per block). Also:
        the reflect/replicate padding moves before the first 1×1 conv (it commutes with per-pixel maps), the
        ``− 1/2`` after each sigmoid folds into the next conv's bias, the 7×7 convolutions run channels-last,
        ``exp(−softplus(r)) = sigmoid(−r)``, and each ActNorm + 1×1 conv is one 2×2 affine map.
        """
        n, _, h, w = u.shape
        size = (h, w)
        low = low_res(size, downsample) if downsample > 1 else size
        mode = "reflect" if min(low) > 3 else "replicate"
        hidden, blocks = self.couplings[0].mid.out_channels, len(self.couplings)
        cond_part = None
        if features is not None and self.cond_norm is not None:
            w_c = torch.cat([c.inp.weight[:, 1:, 0, 0] for c in self.couplings])  # (L·hidden, cond)
            w_c = w_c * self.cond_norm.inv_std.view(1, -1)
            b_c = torch.cat([c.inp.bias for c in self.couplings]) - w_c @ self.cond_norm.mean.view(-1)
            if group is not None:
                w_c = w_c @ group
            feats = F.pad(features, (3, 3, 3, 3), mode=mode)
            hp, wp = feats.shape[-2:]
            cond_part = torch.addmm(b_c.view(-1, 1), w_c, feats.transpose(0, 1).reshape(feats.shape[1], -1))
            cond_part = cond_part.view(blocks, hidden, n, hp, wp)
        for k, (norm, conv, coupling) in enumerate(zip(self.norms, self.convs, self.couplings)):
            scale = norm.log_scale.exp().view(-1)
            bias = conv.weight @ (norm.bias.view(-1) * scale)
            u = torch.matmul(conv.weight * scale, u.flatten(2)).add_(bias.view(2, 1)).view(n, 2, h, w)
            keep = coupling.keep
            xk, xc = u[:, keep : keep + 1], u[:, 1 - keep : 2 - keep]
            xl = F.adaptive_avg_pool2d(xk, low) if low != size else xk
            xl = F.pad(xl, (3, 3, 3, 3), mode=mode)
            inp, mid, out = coupling.inp, coupling.mid, coupling.out
            # the first 1×1 conv: its x_keep column here, its condition columns in cond_part (folded above)
            base = inp.bias.view(1, -1, 1, 1) if cond_part is None else cond_part[k].transpose(0, 1)
            pre = torch.sigmoid_(torch.addcmul(base, xl, inp.weight[:, 0].view(1, -1, 1, 1)))
            # a channels-last weight makes oneDNN run the 7×7 conv channels-last (~2× faster on CPU at 8 channels)
            m = F.conv2d(pre, mid.weight.contiguous(memory_format=torch.channels_last),
                         mid.bias - 0.5 * mid.weight.sum(dim=(1, 2, 3)))
            w_out = out.weight[:, :, 0, 0]
            raw = torch.baddbmm((out.bias - 0.5 * w_out.sum(dim=1)).view(1, 2, 1), w_out.expand(n, 2, hidden),
                                torch.sigmoid_(m).flatten(2)).view(n, 2, *low)
            if low != size:
                raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
            xc.mul_(torch.sigmoid(raw[:, :1].neg())).add_(raw[:, 1:])  # y_c = x_c · exp(log s) + t, in place
        p0, p1 = (-2 * self.log_stds[0]).exp(), (-2 * self.log_stds[1]).exp()
        a = 0.5 * (p0 - p1)
        b = self.means[1] * p1 - self.means[0] * p0
        c = (0.5 * (self.means[0] ** 2 * p0 - self.means[1] ** 2 * p1) + self.log_stds[0] - self.log_stds[1]).sum()
        return (torch.addcmul(b.view(1, 2, 1, 1), a.view(1, 2, 1, 1), u) * u).sum(dim=1) + c

    def class_log_likelihoods(self, u: Tensor, cond: Tensor | None = None) -> Tensor:
        """``log p(u | k) = log N(v; μ_k, σ_k) + log|det|`` for k ∈ {correct, error}: ``(N, 2, H, W)``."""
        v, logdet = self(u, cond)
        z = (v.unsqueeze(1) - self.means.view(1, 2, 2, 1, 1)) * (-self.log_stds).exp().view(1, 2, 2, 1, 1)
        ll = (-0.5 * z**2 - self.log_stds.view(1, 2, 2, 1, 1) - 0.5 * _LOG_2PI).sum(dim=2)
        return ll + logdet.unsqueeze(1)


class FlowEneDet(Detector):
    r"""FlowEneDet (FED-U / FED-C): probability that a pixel is misclassified or out-of-distribution.

    Registered as two detectors, ``"flowenedet-u"`` (:class:`FlowEneDetU`) and ``"flowenedet-c"``
    (:class:`FlowEneDetC`, ``needs_features = True``); ``FlowEneDet(variant=...)`` returns an instance of the one the
    variant names, so every FlowEneDet object declares at class level whether it needs features.

    Per pixel, the standardised logits give a free energy ``E``; its in/out log-probabilities
    ``u = [log σ(−E), log(1 − σ(−E) + 1e−6)]`` go through an ``L``-block flow ``v = f(u; c)`` (FED-C: ``c`` = decoder
    features average-pooled over channel groups to ``cond_channels``; FED-U: none), and

    .. math:: s = p(\text{err} \mid u) = \frac{\mathcal N(v;\mu_1,\sigma_1)}
              {\mathcal N(v;\mu_0,\sigma_0) + \mathcal N(v;\mu_1,\sigma_1)}

    (equal priors; the flow's log-determinant is common to both classes and cancels). Training minimises the pixel
    2-class cross-entropy of the class-conditional log-likelihoods against ``1[ŷ ≠ y]``; with ``void_as_ood=True``
    (official behaviour) ``ignore_index`` pixels are positives, otherwise they are left out.

    Resolution: the flow, its targets and the score live at the logits' resolution. Only the coupling networks
    (the 7×7 context, >95 % of the cost) run on a ``downsample``-times average-pooled copy of their input, with
    the features resized (bilinear) to that grid, and their scale/shift maps are upsampled back — still an exact
    coupling (see :class:`AffineCoupling`). ``downsample=4, hidden_channels=8`` costs ≈ 10 % of ESPNet's forward
    FLOPs on a 480×360 frame (FED-C conditioned on ESPNet's 12-channel classifier input: fewer than 32 channels, so
    no channel pooling).

    Coarse scoring (``score_stride = r > 1``, inference only; *a deviation from the paper*, which scores at the
    classifier's resolution): the whole flow runs on the logits average-pooled over ``r × r`` blocks, its conditioners
    on the same grid as in training (``downsample // r`` further, at least 1), and the probability map is upsampled
    bilinearly to the logits' size. This removes the full-resolution elementwise work (standardising the ``C`` logit
    channels, the affine steps, the bilinear upsampling of every coupling's scale/shift maps) that dominates the wall
    clock of the default path; the scores change (boundaries are smoothed over ``r`` pixels), see ``docs/detectors.md``
    for the measured cost and quality. This path evaluates the flow with :meth:`EnergyFlow.fused_error_logit` (the
    condition's linear steps folded into one matrix for all couplings, and other exact rearrangements): the same scores
    as :meth:`EnergyFlow.error_logit` to float32 rounding (tested). ``score_stride=1`` is the full-resolution path, bit
    for bit. It can be changed on a fitted detector (``det.score_stride = 1``). The default ``None`` means
    ``score_stride = downsample``: the flow then runs exactly on its conditioners' grid (no pooling or upsampling inside
    the couplings). Chosen from evidence: with the shipped ESPNet-CamVid fits it is ≈ 3× cheaper than ``score_stride=1``
    and slightly *better* on CamVid IDM and pasted-anomaly OOD (table in ``docs/detectors.md``); a stride above
    ``downsample`` coarsens the conditioners' grid beyond the trained one and lost quality for FED-C.

    Args:
        variant: ``"u"`` (energy only) or ``"c"`` (conditioned on features).
        n_blocks: number of flow blocks ``L``.
        hidden_channels: width of the coupling networks.
        cond_channels: channel-group pooling target for FED-C (fewer if the feature map has fewer channels).
        downsample: pooling factor of the coupling networks' resolution (1 = full resolution).
        score_stride: inference only: run the flow on ``score_stride``-times average-pooled logits and upsample the
            probability; ``None`` (default) = ``downsample``, the flow at its conditioners' resolution; 1 = the flow
            at the logits' resolution (the paper's setting, the only behaviour before issue 14).
        dropout: Dropout2d rate in the coupling networks.
        void_as_ood: train ignore pixels as positives (True) or exclude them (False).
        ignore_index: label of void pixels.
        epochs: passes over the training batches.
        lr, weight_decay: AdamW settings.
        warmup_steps: linear learning-rate warm-up length (optimiser steps).
        decay_epochs: epochs at whose start the learning rate is multiplied by ``decay_gamma``; ``None`` = at
            ``int(0.75·epochs)`` when ``epochs >= 2``.
        patch_size, patches_per_image: train on random square crops (at the working resolution) instead of whole
            maps; ``None`` = whole maps.
        max_pixels: keep at most this many randomly chosen pixels per batch in the loss; ``None`` = all.
        sml: precomputed :class:`SMLStatistics`; ``None`` = estimated with one extra pass over the training batches.
        seed: seeds the initialisation, sampling and dropout.
        inputs: ``"energy"`` (default, the paper's 2-channel energy input) or ``"energy+msp"`` — an optional,
            non-paper extension whose second channel is the log maximum softmax probability (see :func:`flow_input`).

    Attributes:
        net_: the fitted :class:`EnergyFlow`. sml_: the SML statistics used. num_classes_, feature_channels_,
        cond_channels_: sizes seen in training. history_: mean training loss per epoch.

    References:
        Gudovskiy, Okuno, Nakata, "Concurrent Misclassification and Out-of-Distribution Detection for Semantic
        Segmentation via Energy-Based Normalizing Flow", UAI 2023, arXiv:2305.09610.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 3, 16, 16); y = z.argmax(1)
        >>> y[:, :4] = 0
        >>> det = FlowEneDet(epochs=1, n_blocks=2).fit([(z, y)])
        >>> s = det.score(z)
        >>> s.shape, bool(((s >= 0) & (s <= 1)).all())
        (torch.Size([4, 16, 16]), True)
    """

    _variant: str | None = None
    _learned = ("net_",)

    def __new__(cls, *args: Any, **kwargs: Any) -> FlowEneDet:
        if cls is FlowEneDet:  # dispatch on the variant, so needs_features is a class-level declaration
            cls = _VARIANTS.get(kwargs.get("variant") or "u", cls)
        return super().__new__(cls)

    def __init__(self, *, variant: str | None = None, n_blocks: int = 4, hidden_channels: int = 8,
                 cond_channels: int = 32, downsample: int = 4, dropout: float = 0.2, void_as_ood: bool = True,
                 ignore_index: int | None = 255, epochs: int = 4, lr: float = 1e-3, weight_decay: float = 1e-2,
                 warmup_steps: int = 50,
                 decay_epochs: tuple[int, ...] | None = None, decay_gamma: float = 0.1, patch_size: int | None = None,
                 patches_per_image: int = 1, max_pixels: int | None = None, sml: SMLStatistics | None = None,
                 seed: int = 0, inputs: str = "energy", score_stride: int | None = None) -> None:
        if variant is None:
            variant = self._variant or "u"
        if variant not in ("u", "c"):
            raise ValueError(f"`variant` must be 'u' (energy only) or 'c' (feature-conditioned), got {variant!r}")
        if self._variant is not None and variant != self._variant:
            raise ValueError(f"{type(self).__name__} is FlowEneDet variant {self._variant!r}, got variant={variant!r}")
        for name, val in (("n_blocks", n_blocks), ("hidden_channels", hidden_channels),
                          ("cond_channels", cond_channels), ("downsample", downsample), ("epochs", epochs),
                          ("patches_per_image", patches_per_image)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {val!r}")
        for name, val in (("patch_size", patch_size), ("max_pixels", max_pixels), ("score_stride", score_stride)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"`{name}` must be None or a positive integer, got {val!r}")
        if inputs not in ("energy", "energy+msp"):
            raise ValueError(f"`inputs` must be 'energy' (the paper's) or 'energy+msp' (extension), got {inputs!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        if sml is not None and not isinstance(sml, SMLStatistics):
            raise TypeError(f"`sml` must be a fitted SMLStatistics or None, got {type(sml).__name__}")
        self.variant, self.n_blocks, self.hidden_channels = variant, n_blocks, hidden_channels
        self.cond_channels, self.downsample, self.dropout = cond_channels, downsample, dropout
        self.void_as_ood, self.ignore_index, self.epochs = void_as_ood, ignore_index, epochs
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.decay_epochs = None if decay_epochs is None else tuple(int(e) for e in decay_epochs)
        self.decay_gamma, self.patch_size, self.patches_per_image = decay_gamma, patch_size, patches_per_image
        self.max_pixels, self.sml, self.seed, self.inputs = max_pixels, sml, seed, inputs
        self.score_stride = score_stride

    # ---------------------------------------------------------------- helpers
    def _condition(self, features: Tensor | None, n: int, size: tuple[int, int] | torch.Size, *, fitting: bool
                   ) -> Tensor | None:
        features = self._checked_features(features, n, fitting=fitting)
        if features is None:
            return None
        f = channel_group_pool(features.float(), self.cond_channels)
        return f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)

    def _checked_features(self, features: Tensor | None, n: int, *, fitting: bool) -> Tensor | None:
        if not self.needs_features:
            return None
        if features is None:
            raise ValueError("FlowEneDet(variant='c') needs `features` (N, F, h, w): the decoder features that feed "
                             "the classifier (LogitsStore.batches(features=True) or Segmenter.forward_with_features)")
        features = check_tensor(features, "features")
        if features.ndim != 4 or not features.is_floating_point():
            raise ValueError(f"`features` must be a floating (N, F, h, w) tensor, got {tuple(features.shape)} "
                             f"{features.dtype}")
        if features.shape[0] != n:
            raise ValueError(f"`features` has batch size {features.shape[0]} but `logits` has {n}")
        check_finite(features, "features")
        if not fitting and features.shape[1] != self.feature_channels_:
            raise ValueError(f"`features` has F={features.shape[1]} channels but the detector was fitted with "
                             f"{self.feature_channels_}")
        return features

    # ---------------------------------------------------------------- fit
    def _prepare(self, logits: Tensor, target: Tensor | None, features: Tensor | None, *, fitting: bool):
        logits = check_dense_scores(logits)
        if fitting and hasattr(self, "num_classes_") and logits.shape[1] != self.num_classes_:
            raise ValueError(f"`logits` has C={logits.shape[1]} classes but earlier batches had {self.num_classes_}")
        n, _, h, w = logits.shape
        u = flow_input(logits.float(), self.sml_, self.inputs)
        cond = self._condition(features, n, low_res((h, w), self.downsample), fitting=fitting)
        if target is None:
            return u, cond, None, None
        target = check_target(target, logits.shape[1], self.ignore_index, shape=(n, h, w)).to(logits.device)
        valid = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=bool)
        err = (logits.argmax(1) != target) & valid
        if self.void_as_ood:
            label, weight = (err | ~valid).float(), torch.ones_like(err, dtype=torch.float32)
        else:
            label, weight = err.float(), valid.float()
        return u, cond, label, weight

    def _crop(self, u: Tensor, cond: Tensor | None, t: Tensor, w: Tensor,
              g: torch.Generator) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Random square crops; corners on the conditioner's grid so the low-resolution condition crops align."""
        h, wd = u.shape[-2:]
        p, d = self.patch_size, self.downsample
        if p is None or (p >= h and p >= wd):
            return u, cond, t, w
        ph, pw = min(p, h), min(p, wd)
        idx, tops, lefts = [], [], []
        for i in range(u.shape[0]):
            for _ in range(self.patches_per_image):
                idx.append(i)
                tops.append(d * int(torch.randint(0, (h - ph) // d + 1, (1,), generator=g)))
                lefts.append(d * int(torch.randint(0, (wd - pw) // d + 1, (1,), generator=g)))

        def crop(x: Tensor, f: int, sh: int, sw: int) -> Tensor:
            return torch.stack([x[i, ..., a // f : a // f + sh, b // f : b // f + sw]
                                for i, a, b in zip(idx, tops, lefts)])

        ch, cw = low_res((ph, pw), d)
        return (crop(u, 1, ph, pw), None if cond is None else crop(cond, d, ch, cw), crop(t, 1, ph, pw),
                crop(w, 1, ph, pw))

    def fit(self, batches: BatchSource, *, callback: Callable[[dict[str, float]], None] | None = None
            ) -> FlowEneDet:
        """Stream ``batches``: a ``LogitsStore`` (streamed with features for FED-C), or batches of
        ``LogitsStore.batches(...)`` dicts / ``(logits, target[, features])`` tuples.

        Needs ``epochs`` passes (+1 when ``sml`` is None): give a re-iterable (list) or a zero-arg callable returning
        a fresh iterator. ``callback``, if given, is called after every optimiser step with ``{"epoch", "step",
        "loss", "lr"}`` (progress bars, logging). Returns self.
        """
        batches = from_store(batches, features=self.needs_features)
        passes = self.epochs + (self.sml is None)
        check_source(batches, passes)
        for attr in ("net_", "num_classes_", "feature_channels_", "cond_channels_"):
            self.__dict__.pop(attr, None)
        self.sml_ = self.sml if self.sml is not None else fit_sml_statistics(
            lambda: iterate(batches, passes=passes), self.ignore_index)
        decay = self.decay_epochs if self.decay_epochs is not None else (
            (int(0.75 * self.epochs),) if self.epochs >= 2 else ())
        g = torch.Generator().manual_seed(self.seed)
        history: list[float] = []
        step = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # dropout draws from the global generator
            opt: torch.optim.Optimizer | None = None
            for epoch in range(self.epochs):
                total, count = 0.0, 0
                for logits, target, features in iterate(batches, passes=passes):
                    if target is None:
                        raise ValueError("FlowEneDet.fit needs targets: a batch has no 'target'")
                    u, cond, t, w = self._prepare(logits, target, features, fitting=True)
                    if opt is None:
                        opt = self._build(logits.shape[1], features)
                    u, cond, t, w = self._crop(u, cond, t, w, g)
                    if self.max_pixels is not None:
                        w = self._subsample(w, g)
                    if w.sum() <= 0:
                        continue
                    lr = self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))
                    lr *= self.decay_gamma ** sum(epoch >= e for e in decay)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    ll = self.net_.class_log_likelihoods(u, cond)
                    d = ll[:, 1] - ll[:, 0]
                    loss = (F.binary_cross_entropy_with_logits(d, t, reduction="none") * w).sum() / w.sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    total, count = total + float(loss.detach()), count + 1
                    if callback is not None:
                        callback({"epoch": epoch, "step": step, "loss": float(loss.detach()), "lr": lr})
                if count == 0 and epoch == 0:
                    raise ValueError("`batches` is empty (or has no pixel to train on)")
                history.append(total / max(count, 1))
        self.net_.eval()
        self.history_ = history
        self.n_steps_ = step
        return self

    def _subsample(self, w: Tensor, g: torch.Generator) -> Tensor:
        flat = w.flatten()
        nz = flat.nonzero().flatten()
        if nz.numel() <= self.max_pixels:
            return w
        keep = nz[torch.randperm(nz.numel(), generator=g)[: self.max_pixels]]
        out = torch.zeros_like(flat)
        out[keep] = flat[keep]
        return out.view_as(w)

    def _build(self, num_classes: int, features: Tensor | None) -> torch.optim.Optimizer:
        self.num_classes_ = num_classes
        self.feature_channels_ = int(features.shape[1]) if self.needs_features else 0
        self.cond_channels_ = min(self.cond_channels, self.feature_channels_) if self.needs_features else 0
        self.net_ = EnergyFlow(n_blocks=self.n_blocks, cond_channels=self.cond_channels_,
                               hidden=self.hidden_channels, dropout=self.dropout, seed=self.seed,
                               downsample=self.downsample).train()
        return torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        """Probability of error / OOD per pixel, ``(N, C, H, W)`` logits (+ ``(N, F, h, w)`` features for FED-C)
        → ``(N, H, W)`` float32 in ``[0, 1]`` at the logits' resolution."""
        self._check_fitted()
        logits = check_dense_scores(logits)
        if logits.shape[1] != self.num_classes_:
            raise ValueError(f"`logits` has C={logits.shape[1]} classes but the detector was fitted with "
                             f"{self.num_classes_}")
        self.net_.eval()
        r = self.downsample if self.score_stride is None else self.score_stride
        if r == 1:
            u, cond, _, _ = self._prepare(logits, None, features, fitting=False)
            return torch.sigmoid(self.net_.error_logit(u, cond))
        # coarse path: the whole flow on r-times average-pooled logits, the conditioners on the grid they were
        # trained on (downsample // r further), the probability upsampled bilinearly to the logits' size
        # (EnergyFlow.fused_error_logit: the same numbers as error_logit, to float32 rounding, at about half the cost)
        n, _, h, w = logits.shape
        coarse = low_res((h, w), r)
        inner = max(1, self.downsample // r)
        z = logits.float()
        if h % r or w % r:
            u = _fast_flow_input(box_pool(z, r), 1.0, self.sml_, self.inputs)
        else:
            u = _fast_flow_input(_box_sum(z, r), 1.0 / r**2, self.sml_, self.inputs)
        features = self._checked_features(features, n, fitting=False)
        group = None
        if features is not None:
            features = _bilinear_resize(features.float(), low_res(coarse, inner))
            group = _group_matrix(features.shape[1], self.cond_channels, features)
        s = torch.sigmoid(self.net_.fused_error_logit(u, features, group, inner))
        return F.interpolate(s.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)

    __call__ = score

    # ---------------------------------------------------------------- persistence (the Estimator format)
    def _get_state(self) -> dict[str, Any]:
        return {"net_": self.net_.state_dict(), "sml_": self.sml_, "num_classes_": self.num_classes_,
                "feature_channels_": self.feature_channels_, "cond_channels_": self.cond_channels_,
                "history_": list(self.history_), "n_steps_": getattr(self, "n_steps_", None)}

    def _set_state(self, state: dict[str, Any]) -> None:
        sml = state["sml_"]
        if not isinstance(sml, SMLStatistics):
            raise ValueError("sml_ is not SMLStatistics")
        self.sml_ = sml
        self.num_classes_, self.feature_channels_ = int(state["num_classes_"]), int(state["feature_channels_"])
        self.cond_channels_, self.history_ = int(state["cond_channels_"]), list(state["history_"])
        if state.get("n_steps_") is not None:
            self.n_steps_ = int(state["n_steps_"])
        net = EnergyFlow(n_blocks=self.n_blocks, cond_channels=self.cond_channels_, hidden=self.hidden_channels,
                         dropout=self.dropout, seed=self.seed, downsample=self.downsample)
        net.load_state_dict(state["net_"])
        self.net_ = net.eval()

    @classmethod
    def _upgrade(cls, d: Any) -> Any:
        """Read files of the first FlowEneDet format (``{"format": "segcal.FlowEneDet", "config", "meta", ...}``)."""
        if not (isinstance(d, dict) and d.get("format") == _LEGACY_FORMAT):
            return d
        cfg, meta = dict(d["config"]), d["meta"]
        return {"format": FORMAT, "version": 1, "kind": "detector", "name": f"flowenedet-{cfg['variant']}",
                "class": "FlowEneDet", "params": cfg,
                "state": {"net_": d["state_dict"], "sml_": {"__value__": "sml-statistics", "data": d["sml"]},
                          "num_classes_": meta["num_classes"], "feature_channels_": meta["feature_channels"],
                          "cond_channels_": meta["cond_channels"], "history_": meta["history"]}}


class FlowEneDetU(FlowEneDet):
    """FED-U: FlowEneDet on the energy alone (``FlowEneDet(variant="u")``)."""

    name = "flowenedet-u"
    _variant = "u"


class FlowEneDetC(FlowEneDet):
    """FED-C: FlowEneDet conditioned on decoder features (``FlowEneDet(variant="c")``); fit and score need
    ``features``."""

    name = "flowenedet-c"
    needs_features = True
    _variant = "c"


_VARIANTS: dict[str, type[FlowEneDet]] = {"u": FlowEneDetU, "c": FlowEneDetC}


def load_pretrained(name: str, variant: str = "u") -> FlowEneDet:
    """Load a FlowEneDet shipped in ``segcal/assets/flowenedet-<variant>-<name>.pt`` (e.g. ``"espnet-camvid"``).

    Same as ``get_detector(f"flowenedet-{variant}")``'s class ``.pretrained(name)``, but raises instead of returning
    None.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"`variant` must be 'u' or 'c', got {variant!r}")
    det = _VARIANTS[variant].pretrained(name)
    if det is None:
        assets = resources.files("segcal") / "assets"
        have = sorted(p.name for p in assets.iterdir() if p.name.startswith("flowenedet-")) if assets.is_dir() else []
        raise FileNotFoundError(f"no shipped FlowEneDet 'flowenedet-{variant}-{name}.pt' in segcal/assets; "
                                f"available: {have or 'none'}")
    return det
