"""segcal checkpoint files: one format for fine-tuned models, written by the trainer, read by ``models.load``.

Format (a ``dict`` saved with ``torch.save``; loadable with ``torch.load(..., weights_only=True)``):

================  =====================================================================================
key               value
================  =====================================================================================
``format``        ``"segcal-checkpoint"``
``version``       ``1``
``arch``          builder name in :data:`ARCHITECTURES` (``"espnet"``), or ``None`` for a wrapped model
``arch_config``   keyword arguments of that builder (JSON-like: str / int / float / bool / None / lists)
``name``          model name (``Segmenter.name``)
``num_classes``   C
``class_names``   list of C names
``state_dict``    ``Segmenter.state_dict()`` (network weights under ``net.*``)
anything else     trainer extras, stored as given: ``epoch``, ``step``, ``optimizer``, ``scheduler``,
                  ``metrics``, ``seed``, ``loss``, ``rng_state`` …
================  =====================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .pretrained import build_espnet
from .segmenter import Segmenter

__all__ = ["ARCHITECTURES", "FORMAT", "load_checkpoint", "model_from_checkpoint", "save_checkpoint"]

FORMAT = "segcal-checkpoint"
VERSION = 1
_RESERVED = ("format", "version", "arch", "arch_config", "name", "num_classes", "class_names", "state_dict")

#: builder name -> callable(**arch_config) -> Segmenter (untrained); extend to make new architectures loadable.
ARCHITECTURES: dict[str, Callable[..., Segmenter]] = {"espnet": build_espnet}


def save_checkpoint(path: str | os.PathLike, model: Segmenter, **extra: object) -> Path:
    """Write ``model`` (and trainer extras) to ``path`` atomically (temp file + rename).

    Args:
        path: destination file (parent folders are created).
        model: a :class:`Segmenter`; ``model.arch`` must be set for :func:`segcal.models.load` to rebuild it.
        **extra: stored under their own keys (``epoch=3, optimizer=opt.state_dict(), metrics={...}``); must not
            use the reserved keys of the format.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> from segcal.models.pretrained import build_espnet
        >>> p = save_checkpoint(tempfile.mkdtemp() + "/m.pt", build_espnet(), epoch=1)
        >>> load_checkpoint(p)["epoch"]
        1
    """
    if not isinstance(model, Segmenter):
        raise TypeError(f"`model` must be a segcal Segmenter, got {type(model).__name__}")
    bad = [k for k in extra if k in _RESERVED]
    if bad:
        raise ValueError(f"extra keys {bad} clash with the checkpoint format's reserved keys {list(_RESERVED)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": FORMAT, "version": VERSION, "arch": model.arch, "arch_config": dict(model.arch_config),
            "name": model.name, "num_classes": model.num_classes, "class_names": list(model.class_names),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a segcal checkpoint (``weights_only=True``); returns the dict described above."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated / not a torch file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a segcal checkpoint (missing format={FORMAT!r}); plain ESPNet state_dicts "
                         "load with segcal.models.load(path)")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt['version']}; this segcal reads up to {VERSION}")
    missing = [k for k in _RESERVED if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks keys {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> Segmenter:
    """Rebuild the :class:`Segmenter` described by a checkpoint dict and load its weights strictly."""
    arch = ckpt.get("arch")
    if arch is None:
        raise ValueError("checkpoint has arch=None (a wrapped model): rebuild it yourself and call "
                         "model.load_state_dict(ckpt['state_dict'])")
    if arch not in ARCHITECTURES:
        raise ValueError(f"checkpoint architecture {arch!r} is unknown; known: {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[arch](**ckpt["arch_config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.name = ckpt.get("name", model.name)
    names = list(ckpt["class_names"])
    if len(names) != model.num_classes:
        raise ValueError(f"checkpoint lists {len(names)} class names but its {arch} model has {model.num_classes} "
                         "outputs (a custom head saved with the base model's weights?)")
    model.class_names = names
    return model.eval().to(device)
