"""ESPNet (p=2, q=8): our implementation, key-compatible with the published ``sacmehta/ESPNet`` state_dicts.

Module names mirror the published parameter keys exactly, so both released files (CamVid and Cityscapes) load with
``strict=True``. Only the network lives here; preprocessing and class handling live in :mod:`segcal.models.pretrained`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ESPNet", "ESPNetEncoder"]

_BN_EPS = 1e-3


class _Conv(nn.Module):
    """Bias-free conv with 'same' padding (key: ``conv``)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        pad = (k - 1) // 2 * dilation
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dilation, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _BR(nn.Module):
    """BatchNorm + PReLU (keys: ``bn``, ``act``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c, eps=_BN_EPS)
        self.act = nn.PReLU(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(x))


class _CBR(nn.Module):
    """Conv + BatchNorm + PReLU (keys: ``conv``, ``bn``, ``act``)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.act = nn.PReLU(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _ESPBranches(nn.Module):
    """Reduce, split into dilated branches (1, 2, 4, 8, 16), hierarchical feature fusion, concatenate."""

    def __init__(self, c_in: int, c_out: int, reduce_k: int, reduce_stride: int) -> None:
        super().__init__()
        n = c_out // 5
        self.c1 = _Conv(c_in, n, reduce_k, reduce_stride)
        self.d1 = _Conv(n, c_out - 4 * n, 3, 1, 1)
        self.d2 = _Conv(n, n, 3, 1, 2)
        self.d4 = _Conv(n, n, 3, 1, 4)
        self.d8 = _Conv(n, n, 3, 1, 8)
        self.d16 = _Conv(n, n, 3, 1, 16)

    def branches(self, x: Tensor) -> Tensor:
        r = self.c1(x)
        a1 = self.d2(r)
        a2 = a1 + self.d4(r)
        a3 = a2 + self.d8(r)
        a4 = a3 + self.d16(r)
        return torch.cat([self.d1(r), a1, a2, a3, a4], 1)


class ESPDownsampler(_ESPBranches):
    """Strided ESP block (no residual); BN/PReLU stored flat as ``bn`` / ``act``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, 2)
        self.bn = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.act = nn.PReLU(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.branches(x)))


class ESPBlock(_ESPBranches):
    """ESP block with optional residual; BN/PReLU stored as ``bn.bn`` / ``bn.act``."""

    def __init__(self, c_in: int, c_out: int, residual: bool = True) -> None:
        super().__init__(c_in, c_out, 1, 1)
        self.bn = _BR(c_out)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = self.branches(x)
        return self.bn(x + y if self.residual else y)


class _AvgDown(nn.Module):
    """Input image average-pooled ``times`` times (3x3, stride 2, pad 1); no parameters."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList(nn.AvgPool2d(3, stride=2, padding=1) for _ in range(times))

    def forward(self, x: Tensor) -> Tensor:
        for p in self.pool:
            x = p(x)
        return x


class ESPNetEncoder(nn.Module):
    """ESPNet-C: the encoder, at 1/8 resolution.

    ``forward`` returns a dict of the intermediate maps the decoder needs: ``l1`` (16 ch, 1/2), ``b1`` (19 ch, 1/2),
    ``b2`` (131 ch, 1/4), ``b3`` (256 ch, 1/8) and ``logits`` (C ch, 1/8).
    """

    def __init__(self, num_classes: int, p: int = 2, q: int = 8) -> None:
        super().__init__()
        self.level1 = _CBR(3, 16, 3, 2)
        self.sample1 = _AvgDown(1)
        self.sample2 = _AvgDown(2)
        self.b1 = _BR(16 + 3)
        self.level2_0 = ESPDownsampler(16 + 3, 64)
        self.level2 = nn.ModuleList(ESPBlock(64, 64) for _ in range(p))
        self.b2 = _BR(128 + 3)
        self.level3_0 = ESPDownsampler(128 + 3, 128)
        self.level3 = nn.ModuleList(ESPBlock(128, 128) for _ in range(q))
        self.b3 = _BR(256)
        self.classifier = _Conv(256, num_classes, 1, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        l1 = self.level1(x)
        b1 = self.b1(torch.cat([l1, self.sample1(x)], 1))
        o2_0 = self.level2_0(b1)
        o2 = o2_0
        for layer in self.level2:
            o2 = layer(o2)
        b2 = self.b2(torch.cat([o2, o2_0, self.sample2(x)], 1))
        o3_0 = self.level3_0(b2)
        o3 = o3_0
        for layer in self.level3:
            o3 = layer(o3)
        b3 = self.b3(torch.cat([o3_0, o3], 1))
        return {"l1": l1, "b1": b1, "b2": b2, "b3": b3, "logits": self.classifier(b3)}


class ESPNet(nn.Module):
    r"""ESPNet with the light-weight decoder (Mehta et al., 2018), p=2 and q=8 by default.

    The last decoder stage concatenates the up-sampled class map with a 1/2-resolution skip ``X``: the released
    Cityscapes file uses the 16-channel ``level1`` output (``skip="level1"``), the released CamVid file the 19-channel
    ``b1`` output (``skip="b1"``, the wiring that reproduces its published accuracy).

    Args:
        num_classes: output channels C (12 for the CamVid file, 20 for the Cityscapes file).
        p: residual ESP blocks at 1/4 resolution.
        q: residual ESP blocks at 1/8 resolution.
        skip: ``"b1"`` or ``"level1"``, see above.

    Shape:
        - Input: ``(N, 3, H, W)`` with H and W divisible by 8.
        - Output: ``(N, C, H, W)`` logits; :meth:`forward_features` also returns the decoder feature map that feeds
          the final ``classifier`` (the input of the last transposed conv), ``(N, C, H/2, W/2)``.

    References:
        S. Mehta, M. Rastegari, A. Caspi, L. Shapiro, H. Hajishirzi. ESPNet: Efficient Spatial Pyramid of Dilated
        Convolutions for Semantic Segmentation. ECCV 2018, arXiv:1803.06815.

    Example:
        >>> net = ESPNet(12).eval()
        >>> net(torch.zeros(1, 3, 64, 96)).shape
        torch.Size([1, 12, 64, 96])
    """

    def __init__(self, num_classes: int, p: int = 2, q: int = 8, skip: str = "b1") -> None:
        super().__init__()
        if skip not in ("b1", "level1"):
            raise ValueError(f"`skip` must be 'b1' or 'level1', got {skip!r}")
        if num_classes < 5:
            # The decoder's ESP block splits C channels into five branches of C // 5 each.
            raise ValueError(f"ESPNet needs `num_classes` >= 5 (decoder splits C by 5), got {num_classes}")
        c = num_classes
        self.num_classes = c
        self.skip = skip
        self.encoder = ESPNetEncoder(c, p, q)
        self.level3_C = _Conv(128 + 3, c, 1, 1)
        self.br = nn.BatchNorm2d(c, eps=_BN_EPS)
        self.conv = _CBR((19 if skip == "b1" else 16) + c, c, 3, 1)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, bias=False))
        self.combine_l2_l3 = nn.Sequential(_BR(2 * c), ESPBlock(2 * c, c, residual=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, bias=False), _BR(c))
        self.classifier = nn.ConvTranspose2d(c, c, 2, stride=2, bias=False)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(N, C, H, W)`` and the classifier's input features ``(N, C, H/2, W/2)``."""
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"ESPNet input height and width must be divisible by 8, got {tuple(x.shape[-2:])}")
        e = self.encoder(x)
        up3 = self.up_l3(self.br(e["logits"]))
        comb = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(e["b2"]), up3], 1)))
        feats = self.conv(torch.cat([comb, e["b1"] if self.skip == "b1" else e["l1"]], 1))
        return self.classifier(feats), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]
