"""``Segmenter``: one interface over any segmentation network (preprocess, pad, run, crop, class head)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcal._checks import check_tensor

from .preprocess import as_image_batch

__all__ = ["Segmenter", "extract_logits"]


def extract_logits(out: object) -> Tensor:
    """Find the logits in a network's output.

    Accepts a tensor, a torchvision-style dict (``"out"``, else ``"logits"``), an object with a ``.logits`` attribute
    (Hugging Face ``SemanticSegmenterOutput``) or a tuple/list whose first element is one of these.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        for key in ("out", "logits"):
            if key in out:
                return extract_logits(out[key])
        raise TypeError(f"model returned a dict without an 'out' or 'logits' entry (keys: {sorted(out)})")
    if hasattr(out, "logits"):
        return extract_logits(out.logits)
    if isinstance(out, (tuple, list)) and out:
        return extract_logits(out[0])
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _check_input(x: object) -> Tensor:
    x = check_tensor(x, "x")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"`x` must be a preprocessed float batch of shape (N, 3, H, W), got {tuple(x.shape)}; "
                         "use `Segmenter.preprocess(images)` on uint8 (N, H, W, 3) images first")
    if not x.is_floating_point():
        raise TypeError(f"`x` must be a float tensor (output of `preprocess`), got {x.dtype}")
    return x


class Segmenter(nn.Module):
    r"""A segmentation network with its preprocessing, size constraint and class head.

    ``forward`` pads the preprocessed input on the bottom/right to a multiple of ``size_divisor`` (``pad_mode``,
    reflect by default), runs ``net``, takes the logits out of whatever the net returns (:func:`extract_logits`),
    bilinearly upsamples them to the padded input size when the net predicts at lower resolution (SegFormer: 1/4),
    crops back to ``(H, W)`` and applies ``head`` (e.g. drop a void channel, merge classes). Every step is
    differentiable, so ``forward`` is what a trainer calls.

    Args:
        net: the network; called as ``net(x)``.
        num_classes: number of output classes C (after ``head``).
        preprocess: callable mapping uint8 ``(N, H, W, 3)`` RGB to float ``(N, 3, H, W)`` (a
            :class:`~segcal.models.preprocess.Normalize` or any function).
        class_names: C names; defaults to ``class_0 … class_{C-1}``.
        name: model name (``"espnet-camvid"``, …).
        head: module applied to the cropped raw logits; identity when ``None``.
        size_divisor: input H and W are padded up to a multiple of this.
        pad_mode: ``"reflect"`` (falls back to ``"replicate"`` when the image is too small), ``"replicate"`` or
            ``"constant"`` (zeros in normalised space).
        feature_layer: dotted name of the submodule whose input (``feature_from="input"``) or output
            (``"output"``) is returned by :meth:`forward_with_features`; ``None`` disables features.
        feature_channels: channel count F of that feature map (``None`` if unknown).
        arch, arch_config: how to rebuild this segmenter from a checkpoint (see :mod:`segcal.models.checkpoint`).

    Shape:
        - ``preprocess``: uint8 ``(N, H, W, 3)`` or ``(H, W, 3)`` → float ``(N, 3, H, W)``.
        - ``forward``: ``(N, 3, H, W)`` → logits ``(N, C, H, W)``, any H, W.
        - ``forward_with_features``: → ``(logits, features (N, F, H', W'))``.
        - ``predict_logits``: uint8 ``(H, W, 3)`` → ``(C, H, W)``.

    Example:
        >>> import numpy as np
        >>> net = nn.Conv2d(3, 4, 3, padding=1)
        >>> seg = Segmenter(net, num_classes=4, preprocess=lambda im: as_image_batch(im).permute(0, 3, 1, 2) / 255.)
        >>> seg.predict_logits(np.zeros((5, 7, 3), dtype=np.uint8)).shape
        torch.Size([4, 5, 7])
    """

    def __init__(self, net: nn.Module, *, num_classes: int, preprocess: Callable[[object], Tensor],
                 class_names: Sequence[str] | None = None, name: str = "custom", head: nn.Module | None = None,
                 size_divisor: int = 1, pad_mode: str = "reflect", feature_layer: str | None = None,
                 feature_from: str = "input", feature_channels: int | None = None, arch: str | None = None,
                 arch_config: dict | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be a torch.nn.Module, got {type(net).__name__}")
        if not callable(preprocess):
            raise TypeError("`preprocess` must be callable (uint8 (N, H, W, 3) -> float (N, 3, H, W))")
        if int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
        if class_names is None:
            class_names = [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"`class_names` has {len(class_names)} entries but num_classes={num_classes}")
        if int(size_divisor) < 1:
            raise ValueError(f"`size_divisor` must be >= 1, got {size_divisor}")
        if pad_mode not in ("reflect", "replicate", "constant"):
            raise ValueError(f"`pad_mode` must be 'reflect', 'replicate' or 'constant', got {pad_mode!r}")
        if feature_from not in ("input", "output"):
            raise ValueError(f"`feature_from` must be 'input' or 'output', got {feature_from!r}")
        if feature_layer is not None:
            net.get_submodule(feature_layer)  # fail now, not at the first call
        self.net = net
        self.head = head if head is not None else nn.Identity()
        self._preprocess = preprocess
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.name = name
        self.size_divisor = int(size_divisor)
        self.pad_mode = pad_mode
        self.feature_layer = feature_layer
        self.feature_from = feature_from
        self.feature_channels = feature_channels
        self.arch = arch
        self.arch_config = dict(arch_config or {})
        if isinstance(preprocess, nn.Module):
            self.preprocessor = preprocess  # registered so .to(device) moves its buffers

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # -- preprocessing -------------------------------------------------------------------------------------------
    def preprocess(self, images: object) -> Tensor:
        """uint8 RGB ``(N, H, W, 3)`` / ``(H, W, 3)`` (numpy or tensor) → float ``(N, 3, H, W)`` on the model device."""
        x = self._preprocess(as_image_batch(images))
        return x.to(self.device)

    # -- forward -------------------------------------------------------------------------------------------------
    def _pad(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        if not (ph or pw):
            return x
        mode = self.pad_mode
        if mode == "reflect" and (ph >= h or pw >= w):
            mode = "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def _run(self, x: Tensor) -> Tensor:
        _check_input(x)
        h, w = x.shape[-2:]
        xp = self._pad(x)
        logits = extract_logits(self.net(xp))
        if logits.ndim != 4:
            raise ValueError(f"the wrapped model returned logits of shape {tuple(logits.shape)}; expected (N, C, h, w)")
        if logits.shape[-2:] != xp.shape[-2:]:
            logits = F.interpolate(logits, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(logits[..., :h, :w])

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, C, H, W)`` for a preprocessed batch ``(N, 3, H, W)``; differentiable."""
        return self._run(x)

    @contextlib.contextmanager
    def _capture(self) -> Iterator[list[Tensor]]:
        if self.feature_layer is None:
            raise RuntimeError(f"model {self.name!r} exposes no feature map (feature_layer=None)")
        store: list[Tensor] = []
        layer = self.net.get_submodule(self.feature_layer)
        if self.feature_from == "input":
            handle = layer.register_forward_pre_hook(lambda _m, args: store.append(args[0]))
        else:
            handle = layer.register_forward_hook(lambda _m, _a, out: store.append(extract_logits(out)))
        try:
            yield store
        finally:
            handle.remove()

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(N, C, H, W)`` and the feature map ``(N, F, H', W')`` of ``feature_layer``.

        The features are cropped to the un-padded region: ``H' = ceil(H · h_f / H_pad)`` (e.g. ``ceil(H/2)`` for
        ESPNet's decoder features at 1/2 resolution).
        """
        _check_input(x)
        h, w = x.shape[-2:]
        with self._capture() as store:
            logits = self._run(x)
        feats = store[-1]
        hp, wp = h + (-h) % self.size_divisor, w + (-w) % self.size_divisor
        fh, fw = -(-h * feats.shape[-2] // hp), -(-w * feats.shape[-1] // wp)
        return logits, feats[..., :fh, :fw]

    # -- inference helpers ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    def predict_logits(self, image: object) -> Tensor:
        """Logits ``(C, H, W)`` (float32, CPU-or-model device) for one uint8 RGB image ``(H, W, 3)``; eval, no grad."""
        batch = as_image_batch(image, "image")
        if batch.shape[0] != 1:
            raise ValueError(f"`image` must be one (H, W, 3) image, got a batch of {batch.shape[0]}; "
                             "use predict_batch")
        with self._inference():
            return self._run(self.preprocess(batch))[0].float()

    def predict_batch(self, images: object, features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``(N, C, H, W)`` (and features ``(N, F, H', W')`` when ``features=True``) for uint8 images."""
        with self._inference():
            x = self.preprocess(images)
            if features:
                logits, feats = self.forward_with_features(x)
                return logits.float(), feats.float()
            return self._run(x).float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, size_divisor={self.size_divisor}"
