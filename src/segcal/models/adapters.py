"""``wrap``: turn any PyTorch segmentation network into a :class:`Segmenter`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .preprocess import Normalize, as_image_batch
from .segmenter import Segmenter, extract_logits, meta_parameters

__all__ = ["wrap"]


def wrap(module: nn.Module, *, preprocess: str | Callable[[object], Tensor] = "imagenet",
         num_classes: int | None = None, class_names: Sequence[str] | None = None, name: str | None = None,
         head: nn.Module | None = None, size_divisor: int = 1, pad_mode: str = "reflect",
         feature_layer: str | None = None, feature_from: str = "output",
         feature_channels: int | None = None, output: Callable[[object], Tensor] | None = None) -> Segmenter:
    """Wrap a network returning logits as a :class:`Segmenter`.

    The module's output may be a tensor ``(N, C, h, w)``, a dict with ``"out"`` / ``"logits"`` / ``"seg_logits"``
    (torchvision, Hugging Face ``SemanticSegmenterOutput``: SegFormer predicts at 1/4 resolution), an object with
    ``.logits`` or ``.seg_logits``, or a list of MMSegmentation data samples with ``.seg_logits.data`` ``(C, H, W)``
    (see :func:`~segcal.models.segmenter.extract_logits`); for anything else pass ``output=``. Logits whose size
    differs from the input are bilinearly upsampled (``align_corners=False``) to the input size.

    Args:
        module: the network; it is called as ``module(x)`` with ``x`` float ``(N, 3, H, W)``. For Hugging Face models
            pass a thin lambda module or the model itself (its first positional argument is ``pixel_values``).
        preprocess: ``"imagenet"`` (RGB, /255, ImageNet mean/std), ``"none"`` (RGB float 0–255), a
            :class:`~segcal.models.preprocess.Normalize`, or any callable uint8 ``(N, H, W, 3)`` → ``(N, 3, H, W)``.
        num_classes: C; inferred from ``class_names`` or one dummy 64×64 forward pass when omitted.
        class_names: C names.
        name: model name (default: the module's class name).
        head: optional module applied to the logits (e.g. :class:`~segcal.models.heads.SelectChannels`).
        size_divisor: pad inputs to a multiple of this (e.g. 32 for many encoders).
        pad_mode: see :class:`Segmenter`.
        feature_layer: dotted submodule name whose output (or input, ``feature_from="input"``) is returned as
            features, e.g. ``"decode_head.linear_fuse"`` for SegFormer or ``"classifier.3"`` for DeepLabV3.
        feature_from: ``"output"`` or ``"input"``.
        feature_channels: F of that feature map, if known.
        output: callable mapping the module's output to logits ``(N, C, h, w)``, e.g. ``lambda out: out[1]`` or
            ``lambda out: out["masks"]``; default :func:`~segcal.models.segmenter.extract_logits`.

    Returns:
        Segmenter (``arch=None``: checkpoints of wrapped models store weights only).

    Example:
        >>> net = nn.Conv2d(3, 5, 1)
        >>> seg = wrap(net, num_classes=5)
        >>> import numpy as np
        >>> seg.predict_logits(np.zeros((9, 11, 3), dtype=np.uint8)).shape
        torch.Size([5, 9, 11])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(preprocess, str):
        if preprocess == "imagenet":
            preprocess = Normalize.imagenet()
        elif preprocess == "none":
            preprocess = _float_rgb
        else:
            raise ValueError(f"`preprocess` must be 'imagenet', 'none' or a callable, got {preprocess!r}")
    elif not callable(preprocess):
        raise TypeError("`preprocess` must be 'imagenet', 'none' or a callable")
    if output is not None and not callable(output):
        raise TypeError(f"`output` must be a callable (model output -> logits) or None, got {type(output).__name__}")
    if num_classes is None:
        if class_names is not None:
            num_classes = len(class_names)
        else:
            num_classes = _infer_classes(module, preprocess, head, output)
    return Segmenter(module, num_classes=num_classes, preprocess=preprocess, class_names=class_names,
                     name=name or type(module).__name__, head=head, size_divisor=size_divisor, pad_mode=pad_mode,
                     feature_layer=feature_layer, feature_from=feature_from, feature_channels=feature_channels,
                     output=output)


def _float_rgb(images: object) -> Tensor:
    return as_image_batch(images).permute(0, 3, 1, 2).float()


def _infer_classes(module: nn.Module, preprocess: Callable[[object], Tensor], head: nn.Module | None,
                   output: Callable[[object], Tensor] | None = None) -> int:
    meta = meta_parameters(module)
    if meta:
        raise ValueError(f"`module` has weights on the meta device (no data): {meta[:3]}; materialise them first")
    was_training = module.training
    module.eval()
    try:
        param = next(iter(module.parameters()), None)
        x = preprocess(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
        if param is not None:
            x = x.to(param.device)
        with torch.inference_mode():
            raw = module(x)
            out = extract_logits(raw) if output is None else output(raw)
            if not isinstance(out, Tensor):
                raise TypeError(f"`output` returned {type(out).__name__}; it must return the logits tensor")
            if out.ndim != 4:
                raise ValueError(f"the model returned logits of shape {tuple(out.shape)} for a (1, 3, 64, 64) input; "
                                 "expected (N, C, h, w) (pass `output=` to pick the logits)")
            if head is not None:
                out = head(out)
    finally:
        module.train(was_training)
    return int(out.shape[1])
