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

    Architecture as the official code (:class:`LTSNet`), trained by pixel NLL with Adam. The start is the global
    temperature-scaling solution (``init_temperature="ts"``) or a given float. Positive per-pixel temperatures keep
    the argmax.

    **Budget** (``crop_size`` set, default 64): the fit reads the data **once**. It cuts ``crops_per_image`` seeded
    random ``crop_size²`` windows from every image and keeps at most ``max_crops`` of them, and no more than
    ``max_pool_mb`` of memory (a seeded uniform reservoir sample over the whole data set). Each window is cut from
    the reflect-padded full image with the network's 4-pixel context, so its temperatures equal the full-image
    network's there (exact, not an approximation of the map) — only the pixels that carry loss are sampled. Training
    is then ``epochs`` shuffled passes over this pool, one Adam step per ``batch_crops`` windows, so the cost is
    bounded by ``epochs · max_crops`` windows whatever the size of the data set. A window takes
    ``4 (C + 3) (crop_size + 8)² + 8 crop_size²`` bytes (C = 11 at the defaults: 0.31 MB, so 512 windows take
    160 MB; with 150 classes the 256 MB cap keeps 80 of them). The pool and its seeds do not
    depend on how the data is batched. ``crop_size=None`` trains on whole images instead: one Adam step per batch of
    the fit data, ``epochs`` passes over it (the official scheme, whose runs train for longer — raise ``epochs``).
    There the result depends on the batching, and every epoch reads the data again.

    Ignore pixels carry no loss, but their *logits* are spatial context for neighbouring valid pixels — exactly as at
    test time, where labels are unknown — so LTS is the one calibrator whose fit can depend on logits at ignore
    pixels. Images are required when ``use_image=True`` (in fit and transform); uint8 images are scaled to [0, 1].

    Args:
        ignore_index: label excluded from the loss.
        use_image: use the image branch.
        init_temperature: ``"ts"`` or a float start temperature.
        epochs: passes over the window pool (over the fit data with ``crop_size=None``).
        lr: Adam learning rate (official: 1e-4).
        t_min: floor of the temperature map.
        seed: seeds the TS warm start, the windows and the order of the passes.
        crop_size: side (int) or ``(h, w)`` of the training windows; None = whole images.
        crops_per_image: windows cut from each image.
        max_crops: the most windows kept (reservoir sample over all images).
        batch_crops: windows per Adam step.
        max_pool_mb: the most memory the kept windows may take (fewer windows are kept for many classes).

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``, images ``(N, 3, H, W)``; ``transform`` → ``(N, C, H, W)``;
        ``temperature_map`` → ``(N, H, W)``.

    Attributes:
        net_state_ (dict): LTSNet weights. init_temperature_ (float). image_channels_ (int | None).
        history_ (list[float]): mean training NLL per epoch. n_crops_ (int | None): windows in the pool.

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
    _learned = ("net_state_", "init_temperature_", "image_channels_", "history_", "n_crops_")

    def __init__(self, ignore_index: int | None = 255, *, use_image: bool = True,
                 init_temperature: str | float = "ts", epochs: int = 2, lr: float = 1e-4, t_min: float = 0.05,
                 seed: int = 0, crop_size: int | tuple[int, int] | None = 64, crops_per_image: int = 4,
                 max_crops: int = 512, batch_crops: int = 8, max_pool_mb: float = 256.0) -> None:
        self.ignore_index = ignore_index
        self.use_image = use_image
        self.init_temperature = init_temperature
        self.epochs = epochs
        self.lr = lr
        self.t_min = t_min
        self.seed = seed
        self.crop_size = crop_size
        self.crops_per_image = crops_per_image
        self.max_crops = max_crops
        self.batch_crops = batch_crops
        self.max_pool_mb = max_pool_mb

    def _crop(self) -> tuple[int, int] | None:
        cs = self.crop_size
        if cs is None:
            return None
        cs = (cs, cs) if isinstance(cs, int) and not isinstance(cs, bool) else tuple(cs)  # type: ignore[arg-type]
        if len(cs) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in cs):
            raise ValueError(f"`crop_size` must be a positive int, (h, w) or None, got {self.crop_size!r}")
        for name in ("crops_per_image", "max_crops", "batch_crops"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int (a crop budget), got {v!r}")
        if isinstance(self.max_pool_mb, bool) or not isinstance(self.max_pool_mb, (int, float)) \
                or not self.max_pool_mb > 0:
            raise ValueError(f"`max_pool_mb` must be a positive number (a crop budget), got {self.max_pool_mb!r}")
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
        with torch.enable_grad():
            if crop is None:
                hist = self._train_on_images(net, opt, source)
                self.n_crops_ = None
            else:
                pool = self._pool(net, source, crop)
                hist = self._train_on_pool(net, opt, pool)
                self.n_crops_ = len(pool)
        self.net_state_ = {k_: v.detach().clone() for k_, v in net.state_dict().items()}
        self.init_temperature_ = t0
        self.image_channels_ = k
        self.history_ = hist

    def _step(self, net: LTSNet, opt: torch.optim.Optimizer, z: Tensor, target: Tensor, images: Tensor | None,
              padded: bool) -> tuple[float, int]:
        """One Adam step on the mean NLL of the valid pixels; returns (summed NLL, valid pixels)."""
        valid = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=bool)
        n_valid = int(valid.sum())
        if n_valid == 0:
            return 0.0, 0
        t = net(z, images, padded=padded)
        if padded:
            z = z[..., PAD:-PAD, PAD:-PAD]
        ce = F.cross_entropy(z / t, target.long().masked_fill(~valid, 0), reduction="none")
        loss = torch.where(valid, ce, 0.0).sum() / n_valid
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach()) * n_valid, n_valid

    def _train_on_images(self, net: LTSNet, opt: torch.optim.Optimizer, source: BatchSource) -> list[float]:
        hist = []
        for _ in range(self.epochs):
            total, count = 0.0, 0
            for b in source:
                images = b.images if self.use_image else None
                loss, n = self._step(net, opt, b.logits.float(), b.target, images, padded=False)
                total, count = total + loss, count + n
            hist.append(total / max(count, 1))
        return hist

    def _pool(self, net: LTSNet, source: BatchSource, crop: tuple[int, int]) -> list[tuple[Tensor, ...]]:
        """One pass over the data: ``crops_per_image`` windows per image, a seeded uniform reservoir sample of as many
        as ``max_crops`` and ``max_pool_mb`` allow; each (padded logits, target, padded image or None)."""
        # two streams, so that the windows do not depend on how the images are batched
        g, keep = (torch.Generator().manual_seed(self.seed * 1_000_003 + k) for k in (0, -1))
        pool: list[tuple[Tensor, ...]] = []
        seen, size = 0, self.max_crops
        for b in source:
            images = b.images if self.use_image else None
            zw, tw, iw = self._windows(net, b.logits.float(), b.target, images, crop, g)
            if seen == 0:
                window_bytes = sum(t[0].numel() * t.element_size() for t in (zw, tw, iw) if t is not None)
                size = max(1, min(self.max_crops, int(self.max_pool_mb * 2**20 // window_bytes)))
            for j in range(zw.shape[0]):
                window = (zw[j].clone(), tw[j].clone(), iw[j].clone() if iw is not None else None)
                if seen < size:
                    pool.append(window)
                else:
                    slot = int(torch.randint(0, seen + 1, (1,), generator=keep))
                    if slot < size:
                        pool[slot] = window
                seen += 1
        return pool

    def _train_on_pool(self, net: LTSNet, opt: torch.optim.Optimizer, pool: list[tuple[Tensor, ...]]) -> list[float]:
        hist = []
        for epoch in range(self.epochs):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            order = torch.randperm(len(pool), generator=g).tolist()
            by_shape: dict[tuple[int, ...], list[int]] = {}  # windows of smaller images are smaller
            for i in order:
                by_shape.setdefault(tuple(pool[i][1].shape), []).append(i)
            total, count = 0.0, 0
            for members in by_shape.values():
                for at in range(0, len(members), self.batch_crops):
                    part = [pool[i] for i in members[at:at + self.batch_crops]]
                    images = torch.stack([w[2] for w in part]) if part[0][2] is not None else None
                    loss, n = self._step(net, opt, torch.stack([w[0] for w in part]), torch.stack([w[1] for w in part]),
                                         images, padded=True)
                    total, count = total + loss, count + n
            hist.append(total / max(count, 1))
        return hist

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
