"""``Segmenter``: one interface over any segmentation network (preprocess, pad, run, crop, class head)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcal._checks import check_tensor

from .preprocess import as_image_batch

__all__ = ["Segmenter", "extract_logits", "meta_parameters"]


_OUTPUT_HINT = ("pass `output=` to segcal.models.wrap (a function mapping the model's output to (N, C, H, W) "
                "logits), or return logits from the callable")


def _sample_logits(sample: object, index: int) -> Tensor:
    sl = sample.seg_logits  # type: ignore[attr-defined]
    data = getattr(sl, "data", sl)
    if not isinstance(data, Tensor) or data.ndim != 3:
        raise TypeError(f"data sample {index} of the model output has `.seg_logits` of type {type(data).__name__} "
                        f"{tuple(getattr(data, 'shape', ()))}; expected a (C, H, W) tensor; {_OUTPUT_HINT}")
    return data


def extract_logits(out: object) -> Tensor:
    """Find the logits in a network's output.

    Accepted, in this order:

    - a tensor ``(N, C, h, w)``;
    - a dict (torchvision ``{"out": ..., "aux": ...}``, Hugging Face ``ModelOutput``) with an ``"out"``,
      ``"logits"`` or ``"seg_logits"`` entry;
    - a list/tuple of MMSegmentation-style data samples, each with ``.seg_logits`` whose ``.data`` is ``(C, H, W)``
      (``model(x, mode="predict")``): stacked to ``(N, C, H, W)``;
    - an object with a ``.logits`` or ``.seg_logits`` attribute (``.data`` taken when it is a ``PixelData``);
    - a tuple/list whose first element is one of these (e.g. ``(logits, aux)``).

    Anything else raises ``TypeError`` asking for ``wrap(..., output=fn)``.

    Example:
        >>> extract_logits({"seg_logits": torch.zeros(1, 3, 2, 2)}).shape
        torch.Size([1, 3, 2, 2])
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        for key in ("out", "logits", "seg_logits"):
            if key in out:
                return extract_logits(out[key])
        raise TypeError(f"model returned a dict without an 'out', 'logits' or 'seg_logits' entry (keys: "
                        f"{sorted(map(str, out))}); {_OUTPUT_HINT}")
    if isinstance(out, (tuple, list)) and out and all(hasattr(s, "seg_logits") for s in out):
        return torch.stack([_sample_logits(s, i) for i, s in enumerate(out)])
    for attr in ("logits", "seg_logits"):
        if hasattr(out, attr):
            value = getattr(out, attr)
            return extract_logits(getattr(value, "data", value) if not isinstance(value, Tensor) else value)
    if isinstance(out, (tuple, list)) and out:
        return extract_logits(out[0])
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}; {_OUTPUT_HINT}")


def meta_parameters(module: nn.Module) -> list[str]:
    """Names of parameters / buffers of ``module`` on the ``meta`` device (no data: the model cannot run)."""
    return [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]


def _check_input(x: object) -> Tensor:
    x = check_tensor(x, "x")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"`x` must be a preprocessed float batch of shape (N, 3, H, W), got {tuple(x.shape)}; "
                         "use `Segmenter.preprocess(images)` on uint8 (N, H, W, 3) images first")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"`x` is empty: shape {tuple(x.shape)}; need at least one image of positive height and width")
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
        output: callable mapping the net's raw output to logits ``(N, C, h, w)``; ``None`` uses
            :func:`extract_logits`.

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
                 arch_config: dict | None = None, output: Callable[[object], Tensor] | None = None) -> None:
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
        if output is not None and not callable(output):
            raise TypeError(f"`output` must be a callable (model output -> logits) or None, got "
                            f"{type(output).__name__}")
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
        self.output = output
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
        logits = self.logits_of(self.net(xp))
        if logits.ndim != 4:
            raise ValueError(f"the wrapped model returned logits of shape {tuple(logits.shape)}; expected (N, C, h, w)")
        if logits.shape[-2:] != xp.shape[-2:]:
            logits = F.interpolate(logits, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(logits[..., :h, :w])

    def logits_of(self, raw: object) -> Tensor:
        """The logits in the net's raw output: ``output(raw)`` when an ``output`` callable was given, else
        :func:`extract_logits`."""
        if self.output is None:
            return extract_logits(raw)
        logits = self.output(raw)
        if not isinstance(logits, Tensor):
            raise TypeError(f"`output` of model {self.name!r} returned {type(logits).__name__}; it must return the "
                            "logits tensor (N, C, h, w)")
        return logits

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
        meta = meta_parameters(self)
        if meta:
            raise ValueError(f"model {self.name!r} has weights on the meta device (no data): {meta[:3]}; "
                             "materialise them (e.g. load a state_dict with assign=True) before predicting")
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
