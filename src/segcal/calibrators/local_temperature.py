"""Local temperature scaling."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from segcal.calibrators._base import BatchSource, Calibrator
from segcal.calibrators.temperature import TemperatureScaling


def _conv(cin: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, 1, kernel_size=5, dilation=2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LTSNet(nn.Module):
    """Temperature-map network of the official LTS code (zero-initialised 5×5 dilated reflect-padded convs).

    Four chained logit convolutions (each adds 1), three gates from the logits mixing them, an image branch and an
    image gate. With zero weights every branch equals 1, so ``T = clamp(mix − 1 + t0, t_min)`` starts at ``t0``
    everywhere. The official ``ReLU(mix + 1) + 1e-8`` starts at T = 2 — twice too soft for a reasonably calibrated
    model — and a dead ReLU gives T = 1e-8; segcal starts at the global TS temperature instead and floors T at t_min.
    """

    def __init__(self, num_classes: int, image_channels: int | None, t0: float, t_min: float) -> None:
        super().__init__()
        c = num_classes
        self.t0, self.t_min = t0, t_min
        self.conv = nn.ModuleList([_conv(c), _conv(1), _conv(1), _conv(1)])
        self.gate = nn.ModuleList([_conv(c) for _ in range(3)])
        self.img = _conv(image_channels) if image_channels else None
        self.img_gate = _conv(image_channels) if image_channels else None

    @staticmethod
    def _pad(x: Tensor) -> Tensor:
        # Reflect padding (official) needs H, W > 4; tiny inputs fall back to replicate.
        mode = "reflect" if min(x.shape[-2:]) > 4 else "replicate"
        return F.pad(x, (4, 4, 4, 4), mode=mode)

    def forward(self, z: Tensor, images: Tensor | None) -> Tensor:
        p = self._pad
        t1 = self.conv[0](p(z)) + 1
        t2 = self.conv[1](p(t1)) + 1
        t3 = self.conv[2](p(t2)) + 1
        t4 = self.conv[3](p(t3)) + 1
        zp = p(z)
        g1, g2, g3 = (torch.sigmoid(g(zp)) for g in self.gate)
        mix = g3 * (g1 * t4 + (1 - g1) * t3) + (1 - g3) * (g2 * t2 + (1 - g2) * t1)
        if self.img is not None and self.img_gate is not None and images is not None:
            ip = p(images)
            gi = torch.sigmoid(self.img_gate(ip))
            mix = gi * mix + (1 - gi) * (self.img(ip) + 1)
        return (mix - 1 + self.t0).clamp_min(self.t_min)


class LocalTemperatureScaling(Calibrator):
    r"""Local temperature scaling: a per-pixel temperature map predicted from the logits (and the image).

    .. math::
        z'_i = z_i / T_i, \qquad T = \mathrm{LTSNet}(z, \text{image}), \qquad
        \min \; \mathrm{mean}_{i \in V} -\log\operatorname{softmax}(z_i / T_i)_{y_i}

    Architecture as the official code (:class:`LTSNet`), trained by pixel NLL with Adam over the batches of the fit
    data for ``epochs`` passes (one Adam step per batch, so the result depends on the batching). The start is the
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
        seed: seeds the (deterministic) initialisation and TS warm start.

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
                 seed: int = 0) -> None:
        self.ignore_index = ignore_index
        self.use_image = use_image
        self.init_temperature = init_temperature
        self.epochs = epochs
        self.lr = lr
        self.t_min = t_min
        self.seed = seed

    def _fit(self, source: BatchSource) -> None:
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
            for _ in range(self.epochs):
                total, count = 0.0, 0
                for b in source:
                    valid = b.target != self.ignore_index if self.ignore_index is not None else None
                    n_valid = int(valid.sum()) if valid is not None else b.target.numel()
                    if n_valid == 0:
                        continue
                    z = b.logits.float()
                    t = net(z, b.images if self.use_image else None)
                    ce = nn.functional.cross_entropy(z / t, b.target.long().masked_fill(~valid, 0)
                                                     if valid is not None else b.target.long(), reduction="none")
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

    def _net(self) -> LTSNet:
        net = LTSNet(self.num_classes_, self.image_channels_, self.init_temperature_, self.t_min)
        net.load_state_dict(self.net_state_)
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
