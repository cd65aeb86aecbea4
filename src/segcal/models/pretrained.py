"""The published ESPNet checkpoints (CamVid, Cityscapes→CamVid) as :class:`Segmenter` objects.

Weights are *not* shipped with segcal: they are read from ``<data root>/espnet_pretrained/decoder/`` (data root:
:func:`segcal.data.data_root`, i.e. ``$SEGCAL_DATA`` or ``../shared/data``; the
``pretrained/decoder`` folder of https://github.com/sacmehta/ESPNet, MIT licence).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from segcal._io import safe_torch_load

from .espnet import ESPNet
from .heads import MergeClasses, SelectChannels
from .preprocess import Normalize
from .segmenter import Segmenter

__all__ = [
    "CAMVID_MEAN_BGR",
    "CAMVID_STD_BGR",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_MEAN_BGR",
    "CITYSCAPES_STD_BGR",
    "CITYSCAPES_TO_CAMVID",
    "PRETRAINED",
    "build_espnet",
    "pretrained_path",
]

_CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                   "Pedestrian", "Bicyclist")

# Not stored upstream: recomputed the way ESPNet's loader does (mean over CamVid-train images of per-image channel
# mean / std), see espnet_pretrained/README.md.
CAMVID_MEAN_BGR = (110.331, 108.409, 105.033)
CAMVID_STD_BGR = (72.126, 72.691, 69.904)
# From the upstream Cityscapes inference script.
CITYSCAPES_MEAN_BGR = (72.3923, 82.9089, 73.1584)
CITYSCAPES_STD_BGR = (45.3192, 46.1529, 44.9148)

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")

#: CamVid class -> Cityscapes trainIds whose probabilities are summed (void channel 19 is in no group).
CITYSCAPES_TO_CAMVID: dict[str, tuple[int, ...]] = {
    "Sky": (10,),
    "Building": (2, 3),
    "Pole": (5,),
    "Road": (0,),
    "Pavement": (1,),
    "Tree": (8, 9),
    "SignSymbol": (6, 7),
    "Fence": (4,),
    "Car": (13, 14, 15, 16),
    "Pedestrian": (11,),
    "Bicyclist": (12, 17, 18),
}

#: name -> (weights file under espnet_pretrained/decoder/, build_espnet keyword arguments)
PRETRAINED: dict[str, tuple[str, dict]] = {
    "espnet-camvid": ("espnet_p_2_q_8_camvid.pth", {"dataset": "camvid"}),
    "espnet-cityscapes": ("espnet_p_2_q_8.pth", {"dataset": "cityscapes"}),
}


def pretrained_path(name: str) -> Path:
    """Path of a published weights file under :func:`segcal.data.data_root`; ``FileNotFoundError`` naming the path
    and the SEGCAL_DATA rule when absent."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown model name {name!r}; known names: {sorted(PRETRAINED)}")
    from segcal.data.spec import data_root, data_root_hint

    path = data_root() / "espnet_pretrained" / "decoder" / PRETRAINED[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: weights file not found at {path} ({data_root_hint()}). "
                                "Download it from https://github.com/sacmehta/ESPNet/tree/master/pretrained/decoder "
                                "into <data root>/espnet_pretrained/decoder/")
    return path


def build_espnet(dataset: str = "camvid", num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, name: str | None = None) -> Segmenter:
    r"""An (untrained) ESPNet p=2, q=8 wrapped as a :class:`Segmenter`, wired like a published checkpoint.

    ``dataset="camvid"``: 12 raw channels (CamVid ids 0–10 + "unlabelled"), ``b1`` skip wiring, CamVid BGR mean/std;
    the head **drops the unlabelled channel 11** and returns the 11 class logits unchanged (softmax renormalises over
    the 11 classes, as in the published evaluation, which takes the argmax over channels 0–10).

    ``dataset="cityscapes"``: 20 raw channels (trainIds 0–18 + void), ``level1`` skip wiring, Cityscapes BGR
    mean/std; the head merges the 19 class probabilities into the 11 CamVid classes (:data:`CITYSCAPES_TO_CAMVID`,
    void dropped) and returns **log-probabilities** (:class:`~segcal.models.heads.MergeClasses`).

    ``num_classes`` (CamVid wiring only) builds a fresh network with that many output channels and no dropped
    channel, for fine-tuning on another label set.

    Preprocessing (both): RGB → BGR, ``(x − mean) / std``, then ÷255 (the published pipeline really does this).
    Input sides are padded (reflect) to a multiple of 8 and the logits cropped back. Features for
    :meth:`Segmenter.forward_with_features`: the input of the final ``classifier`` transposed conv, i.e. the last
    decoder map, ``(N, C_raw, ceil(H/2), ceil(W/2))`` (12 channels for CamVid, 20 for Cityscapes).

    Args:
        dataset: ``"camvid"`` or ``"cityscapes"`` (wiring, normalisation and head).
        num_classes: optional output classes for a fresh CamVid-wired network (``None``: the published 11 + 1).
        class_names: names of the output classes (default: CamVid's 11).
        name: segmenter name.

    Returns:
        Segmenter with random weights (load a state_dict into ``.net``).

    Example:
        >>> seg = build_espnet("camvid")
        >>> seg.num_classes, seg.feature_channels
        (11, 12)
    """
    cfg = {"dataset": dataset, "num_classes": num_classes,
           "class_names": list(class_names) if class_names is not None else None, "name": name}
    if dataset == "camvid":
        if num_classes is None:
            net = ESPNet(12, skip="b1")
            head = SelectChannels(range(11))
            c = 11
        else:
            net = ESPNet(int(num_classes), skip="b1")
            head, c = None, int(num_classes)
        norm = Normalize(CAMVID_MEAN_BGR, CAMVID_STD_BGR, bgr=True, scale=1 / 255)
    elif dataset == "cityscapes":
        if num_classes is not None:
            raise ValueError("`num_classes` is only supported for dataset='camvid'")
        net = ESPNet(20, skip="level1")
        head = MergeClasses([CITYSCAPES_TO_CAMVID[k] for k in _CAMVID_CLASSES])
        c = 11
        norm = Normalize(CITYSCAPES_MEAN_BGR, CITYSCAPES_STD_BGR, bgr=True, scale=1 / 255)
    else:
        raise ValueError(f"`dataset` must be 'camvid' or 'cityscapes', got {dataset!r}")
    if class_names is None:
        class_names = _CAMVID_CLASSES if c == 11 else [f"class_{i}" for i in range(c)]
    return Segmenter(net, num_classes=c, preprocess=norm, class_names=class_names,
                     name=name or f"espnet-{dataset}", head=head, size_divisor=8, pad_mode="reflect",
                     feature_layer="classifier", feature_from="input", feature_channels=net.num_classes,
                     arch="espnet", arch_config=cfg)


def flush_subnormals(state: dict) -> dict:
    """Set subnormal float entries (|v| < finfo.tiny) to zero, in place; returns ``state``.

    The published Cityscapes file holds 1,861 subnormal weights (|w| < 1e-30). They change no output, but x86 CPUs
    process subnormals in microcode: inference was ~20x slower (6 s instead of 0.3 s per 480x360 image).
    """
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v[(v != 0) & (v.abs() < torch.finfo(v.dtype).tiny)] = 0
    return state


def load_weights_strict(net: nn.Module, state: dict, source: str) -> None:
    """``net.load_state_dict(state, strict=True)`` with a one-line ``ValueError`` naming ``source`` on mismatch."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise ValueError(f"{source} does not fit the network: {' '.join(lines[1:3] or lines[:1])[:300]}") from err


def load_pretrained(name: str, device: str | torch.device = "cpu") -> Segmenter:
    """Build the named published ESPNet and load its weights strictly (``weights_only=True``)."""
    path = pretrained_path(name)
    kwargs = PRETRAINED[name][1]
    seg = build_espnet(name=name, **kwargs)
    state = safe_torch_load(path, f"weights of {name!r}")
    if not isinstance(state, dict):
        raise ValueError(f"cannot read weights of {name!r} {path}: holds a {type(state).__name__}, not a state_dict")
    load_weights_strict(seg.net, flush_subnormals(state), f"weights file {path}")
    return seg.eval().to(device)
