"""``segcal.models.load``: a Segmenter from a published name, a segcal checkpoint or a raw ESPNet state_dict."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import FORMAT, load_checkpoint, model_from_checkpoint
from .pretrained import PRETRAINED, build_espnet, flush_subnormals, load_pretrained
from .segmenter import Segmenter

__all__ = ["available_models", "load"]


def available_models() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(PRETRAINED)


def _espnet_from_state_dict(state: dict, path: Path) -> Segmenter:
    w = state.get("conv.conv.weight")
    if w is None or "encoder.level1.conv.weight" not in state:
        raise ValueError(f"{path} holds a state_dict that is neither a segcal checkpoint nor an ESPNet state_dict")
    c, c_in = int(w.shape[0]), int(w.shape[1])
    if c == 12 and c_in - c == 19:
        seg = build_espnet("camvid", name=path.stem)
    elif c == 20 and c_in - c == 16:
        seg = build_espnet("cityscapes", name=path.stem)
    elif c_in - c == 19:
        seg = build_espnet("camvid", num_classes=c, name=path.stem)
    else:
        raise ValueError(f"{path}: ESPNet state_dict with {c} classes and a {c_in - c}-channel skip is not a "
                         "supported wiring (12+19 CamVid, 20+16 Cityscapes, or C+19)")
    seg.net.load_state_dict(flush_subnormals(state), strict=True)
    return seg


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> Segmenter:
    """Load a segmentation model as a :class:`Segmenter` in eval mode.

    Args:
        name_or_path: a published name (``"espnet-camvid"``, ``"espnet-cityscapes"``; weights read from
            ``$SEGCAL_DATA/espnet_pretrained/decoder/``), a segcal checkpoint written by
            :func:`~segcal.models.checkpoint.save_checkpoint`, or a raw published ESPNet ``.pth`` state_dict.
        device: where to put the model.

    Returns:
        Segmenter with ``num_classes``, ``class_names``, ``predict_logits`` … (see :class:`Segmenter`).

    Raises:
        ValueError: unknown name (the message lists the known ones) or unreadable file.
        FileNotFoundError: weights / file missing (the message names the path and SEGCAL_DATA).

    Example:
        >>> import tempfile
        >>> from segcal.models import build_espnet, save_checkpoint
        >>> p = save_checkpoint(tempfile.mkdtemp() + "/m.pt", build_espnet())
        >>> load(p).num_classes
        11
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a model name or a path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        return load_pretrained(name_or_path, device)
    path = Path(name_or_path)
    if not path.is_file():
        looks_like_path = isinstance(name_or_path, os.PathLike) or os.sep in str(name_or_path) \
            or path.suffix in (".pt", ".pth", ".ckpt")
        if looks_like_path:
            raise FileNotFoundError(f"model file not found: {path}")
        raise ValueError(f"unknown model name {str(name_or_path)!r}; known names: {available_models()} "
                         "(or pass the path of a checkpoint file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read model file {path}: {err}") from err
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return model_from_checkpoint(load_checkpoint(path), device)
    if isinstance(obj, dict):
        return _espnet_from_state_dict(obj, path).eval().to(device)
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a segcal checkpoint or a state_dict")
