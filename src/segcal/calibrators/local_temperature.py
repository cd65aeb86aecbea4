"""Local temperature scaling."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from segcal.calibrators._base import BatchSource, Calibrator
from segcal.calibrators.temperature import TemperatureScaling

#: Reflect padding of the 5×5 dilation-2 convolutions (their receptive field is 9×9).
PAD = 4


def _conv(cin: int, cout: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=5, dilation=2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LTSNet(nn.Module):
    r"""Temperature-map network of the official LTS code (``LTS_CamVid_With_Image``, github.com/uncbiag/LTS).

    Every branch and every gate is one zero-initialised 5×5, dilation-2, reflect-padded convolution; all but the image
    branch read the **logits** (C → 1):

    .. math::
        t_k = \mathrm{conv}_k(z) + 1 \ (k = 1..4), \quad g_k = \sigma(\mathrm{gate}_k(z)) \ (k = 1..3), \quad
        m = g_3 \big(g_1 t_1 + (1 - g_1) t_2\big) + (1 - g_3) \big(g_2 t_3 + (1 - g_2) t_4\big)

    and with images, :math:`t_{img} = \mathrm{conv}_{img}(x) + 1` (3 → 1) mixed in by a gate on the logits,
    :math:`g = \sigma(\mathrm{gate}_{img}(z))`, :math:`m \leftarrow g\, m + (1 - g)\, t_{img}`. Parameters:
    ``8·(25·C + 1) + 25·3 + 1`` = 2284 for C = 11 with the image (``7·(25·C + 1)`` without), as the official network.
    The seven (eight) logit convolutions are stored as one ``C → 7 (8)`` convolution ``logit_convs`` — the same
    function and parameter count, one kernel call; output channels in the official order conv1..4, param1..3,
    param_img.

    Deviation (documented): the official output ``ReLU(m + 1) + 1e-8`` starts at T = 2 everywhere — twice too soft for
    a reasonably calibrated model — and a dead ReLU gives T = 1e-8; segcal returns ``T = max(m − 1 + t0, t_min)``,
    which starts at ``t0`` (the global TS temperature by default) and never collapses.
    """

    def __init__(self, num_classes: int, image_channels: int | None, t0: float, t_min: float) -> None:
        super().__init__()
        self.t0, self.t_min = t0, t_min
        self.logit_convs = _conv(num_classes, 8 if image_channels else 7)
        self.img = _conv(image_channels) if image_channels else None

    @staticmethod
    def pad(x: Tensor) -> Tensor:
        # Reflect padding (official) needs H, W > PAD; tiny inputs fall back to replicate.
        mode = "reflect" if min(x.shape[-2:]) > PAD else "replicate"
        return F.pad(x, (PAD, PAD, PAD, PAD), mode=mode)

    def forward(self, z: Tensor, images: Tensor | None, *, padded: bool = False) -> Tensor:
        """``(N, 1, H, W)`` temperatures; with ``padded=True`` the inputs already carry the PAD border (crops)."""
        zp = z if padded else self.pad(z)
        out = self.logit_convs(zp)
        t = out[:, :4] + 1
        g1, g2, g3 = (torch.sigmoid(out[:, k:k + 1]) for k in (4, 5, 6))
        mix = (g3 * (g1 * t[:, 0:1] + (1 - g1) * t[:, 1:2])
               + (1 - g3) * (g2 * t[:, 2:3] + (1 - g2) * t[:, 3:4]))
        if self.img is not None and images is not None:
            gi = torch.sigmoid(out[:, 7:8])
            mix = gi * mix + (1 - gi) * (self.img(images if padded else self.pad(images)) + 1)
        return (mix - 1 + self.t0).clamp_min(self.t_min)


def _crop_origins(h: int, w: int, ch: int, cw: int, k: int, g: torch.Generator) -> list[tuple[int, int]]:
    ys = torch.randint(0, h - ch + 1, (k,), generator=g).tolist()
    xs = torch.randint(0, w - cw + 1, (k,), generator=g).tolist()
    return list(zip(ys, xs))


class LocalTemperatureScaling(Calibrator):
    r"""Local temperature scaling: a per-pixel temperature map predicted from the logits (and the image).

    .. math::
        z'_i = z_i / T_i, \qquad T = \mathrm{LTSNet}(z, \text{image}), \qquad
        \min \; \mathrm{mean}_{i \in V} -\log\operatorname{softmax}(z_i / T_i)_{y_i}

    Architecture as the official code (:class:`LTSNet`), trained by pixel NLL with Adam over the batches of the fit
    data for ``epochs`` passes (one Adam step per batch, so the result depends on the batching). **Pixel budget**: with
    ``crop_size`` set (default 64), each step trains on ``crops_per_image`` seeded random ``crop_size²`` windows per
    image instead of the whole image; each window is cut from the reflect-padded full image with the network's 4-pixel
    context, so its temperatures equal the full-image network's there (exact, not an approximation of the map) — only
    the pixels that carry loss are sampled. ``crop_size=None`` trains on whole images. The start is the
    global temperature-scaling solution (``init_temperature="ts"``) or a given float. Positive per-pixel temperatures
    keep the argmax. Ignore pixels carry no loss, but their *logits* are spatial context for neighbouring valid
    pixels — exactly as at test time, where labels are unknown — so LTS is the one calibrator whose fit can depend on
    logits at ignore pixels. Images are required when ``use_image=True`` (in fit and transform); uint8 images are
    scaled to [0, 1].

    Args:
        ignore_index: label excluded from the loss.
        use_image: use the image branch.
        init_temperature: ``"ts"`` or a float start temperature.
        epochs: passes over the fit data. lr: Adam learning rate (official: 1e-4).
        t_min: floor of the temperature map.
        seed: seeds the TS warm start and the crop positions (a generator seeded with ``(seed, epoch)``).
        crop_size: side (int) or ``(h, w)`` of the training windows; None = whole images.
        crops_per_image: windows per image per epoch.

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``, images ``(N, 3, H, W)``; ``transform`` → ``(N, C, H, W)``;
        ``temperature_map`` → ``(N, H, W)``.

    Attributes:
        net_state_ (dict): LTSNet weights. init_temperature_ (float). image_channels_ (int | None).
        history_ (list[float]): mean training NLL per epoch.

    References:
        Ding, Liu, Xiong, Shi, "Local Temperature Scaling for Probability Calibration", ICCV 2021, arXiv:2008.05105.

    Example:
        >>> z, y = torch.randn(2, 3, 16, 16) * 3, torch.randint(0, 3, (2, 16, 16))
        >>> img = torch.rand(2, 3, 16, 16)
        >>> lts = LocalTemperatureScaling(epochs=1).fit(z, y, images=img)
        >>> lts.transform(z, img).shape
        torch.Size([2, 3, 16, 16])
    """

    needs_images = True
    name = "lts"
    _learned = ("net_state_", "init_temperature_", "image_channels_", "history_")

    def __init__(self, ignore_index: int | None = 255, *, use_image: bool = True,
                 init_temperature: str | float = "ts", epochs: int = 10, lr: float = 1e-4, t_min: float = 0.05,
                 seed: int = 0, crop_size: int | tuple[int, int] | None = 64, crops_per_image: int = 2) -> None:
        self.ignore_index = ignore_index
        self.use_image = use_image
        self.init_temperature = init_temperature
        self.epochs = epochs
        self.lr = lr
        self.t_min = t_min
        self.seed = seed
        self.crop_size = crop_size
        self.crops_per_image = crops_per_image

    def _crop(self) -> tuple[int, int] | None:
        cs = self.crop_size
        if cs is None:
            return None
        cs = (cs, cs) if isinstance(cs, int) and not isinstance(cs, bool) else tuple(cs)  # type: ignore[arg-type]
        if len(cs) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in cs):
            raise ValueError(f"`crop_size` must be a positive int, (h, w) or None, got {self.crop_size!r}")
        if isinstance(self.crops_per_image, bool) or not isinstance(self.crops_per_image, int) \
                or self.crops_per_image < 1:
            raise ValueError(f"`crops_per_image` must be a positive int, got {self.crops_per_image!r}")
        return int(cs[0]), int(cs[1])

    def _fit(self, source: BatchSource) -> None:
        crop = self._crop()
        if self.init_temperature == "ts":
            ts = TemperatureScaling(self.ignore_index, seed=self.seed)
            ts._all_reduce = self._all_reduce  # type: ignore[method-assign]
            ts._fit(source)
            t0 = ts.temperature_
        elif isinstance(self.init_temperature, (int, float)) and self.init_temperature > 0:
            t0 = float(self.init_temperature)
        else:
            raise ValueError(f"`init_temperature` must be 'ts' or a positive float, got {self.init_temperature!r}")
        first = next(iter(source))
        k = None
        if self.use_image:
            if first.images is None:
                raise ValueError("LocalTemperatureScaling(use_image=True) needs `images` (N, 3, H, W) in fit; pass "
                                 "images=... or batches with 'images', or set use_image=False")
            k = first.images.shape[1]
        net = LTSNet(first.logits.shape[1], k, t0, self.t_min)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        hist: list[float] = []
        with torch.enable_grad():
            for epoch in range(self.epochs):
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                total, count = 0.0, 0
                for b in source:
                    z, target = b.logits.float(), b.target
                    images = b.images if self.use_image else None
                    if crop is not None:
                        z, target, images = self._windows(net, z, target, images, crop, g)
                    valid = target != self.ignore_index if self.ignore_index is not None else None
                    n_valid = int(valid.sum()) if valid is not None else target.numel()
                    if n_valid == 0:
                        continue
                    if crop is not None:
                        t = net(z, images, padded=True)
                        z = z[..., PAD:-PAD, PAD:-PAD]
                    else:
                        t = net(z, images)
                    ce = nn.functional.cross_entropy(z / t, target.long().masked_fill(~valid, 0)
                                                     if valid is not None else target.long(), reduction="none")
                    if valid is not None:
                        ce = torch.where(valid, ce, 0.0)
                    loss = ce.sum() / n_valid
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * n_valid
                    count += n_valid
                hist.append(total / max(count, 1))
        self.net_state_ = {k_: v.detach().clone() for k_, v in net.state_dict().items()}
        self.init_temperature_ = t0
        self.image_channels_ = k
        self.history_ = hist

    def _windows(self, net: LTSNet, z: Tensor, target: Tensor, images: Tensor | None, crop: tuple[int, int],
                 g: torch.Generator) -> tuple[Tensor, Tensor, Tensor | None]:
        """Seeded windows (with the PAD context of the padded full image) of every image of a batch."""
        n, _, h, w = z.shape
        ch, cw = min(crop[0], h), min(crop[1], w)
        zp = net.pad(z)
        ip = net.pad(images.float()) if images is not None else None
        zs, ts, ims = [], [], []
        for i in range(n):
            for y0, x0 in _crop_origins(h, w, ch, cw, self.crops_per_image, g):
                zs.append(zp[i, :, y0:y0 + ch + 2 * PAD, x0:x0 + cw + 2 * PAD])
                ts.append(target[i, y0:y0 + ch, x0:x0 + cw])
                if ip is not None:
                    ims.append(ip[i, :, y0:y0 + ch + 2 * PAD, x0:x0 + cw + 2 * PAD])
        return torch.stack(zs), torch.stack(ts), torch.stack(ims) if ip is not None else None

    def _net(self) -> LTSNet:
        net = LTSNet(self.num_classes_, self.image_channels_, self.init_temperature_, self.t_min)
        try:
            net.load_state_dict(self.net_state_)
        except RuntimeError:
            raise ValueError("this LocalTemperatureScaling was fitted with segcal's earlier (non-official) LTS "
                             "network, whose weights do not fit the official architecture; refit it") from None
        return net.eval()

    def temperature_map(self, logits: Tensor, images: Tensor | None = None) -> Tensor:
        """Per-pixel temperature ``(N, H, W)``."""
        self._check_fitted()
        z = self.transform(logits, images)  # validates
        del z
        with torch.no_grad():
            return self._net()(logits.float(), self._images(images, logits))[:, 0]

    def _images(self, images: Tensor | None, logits: Tensor) -> Tensor | None:
        if not self.use_image:
            return None
        if images is None:
            raise ValueError("LocalTemperatureScaling(use_image=True).transform needs `images` (N, 3, H, W)")
        from segcal._checks import check_images

        return check_images(images, logits.shape)

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        t = self._net()(z.float(), self._images(images, z))
        return z / t.to(z.dtype)
