"""segcal.models: the reference ESPNet, adapters for other frameworks, checkpoint loading.

``load(spec)`` returns a :class:`Segmenter` for a published name (``"espnet-camvid"``), a segcal checkpoint, a
TorchScript file or ``"file.py:callable"`` / ``"package.module:callable"`` (optionally ``"...@weights.pt"``);
``wrap(module)`` adapts any PyTorch segmentation network. See ``docs/models.md``.
"""

from .adapters import wrap
from .checkpoint import ARCHITECTURES, load_checkpoint, load_weights, model_from_checkpoint, save_checkpoint
from .espnet import ESPNet
from .heads import MergeClasses, SelectChannels
from .load import available_models, load, resolve_device
from .preprocess import Normalize
from .pretrained import CITYSCAPES_TO_CAMVID, PRETRAINED, build_espnet, pretrained_path
from .segmenter import Segmenter, extract_logits

__all__ = [
    "ARCHITECTURES",
    "CITYSCAPES_TO_CAMVID",
    "PRETRAINED",
    "ESPNet",
    "MergeClasses",
    "Normalize",
    "Segmenter",
    "SelectChannels",
    "available_models",
    "build_espnet",
    "extract_logits",
    "load",
    "load_checkpoint",
    "load_weights",
    "model_from_checkpoint",
    "pretrained_path",
    "resolve_device",
    "save_checkpoint",
    "wrap",
]
