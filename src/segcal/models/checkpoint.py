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

from segcal._io import atomic_torch_save, safe_torch_load

from .pretrained import build_espnet
from .segmenter import Segmenter

__all__ = ["ARCHITECTURES", "FORMAT", "load_checkpoint", "load_weights", "model_from_checkpoint", "save_checkpoint"]

FORMAT = "segcal-checkpoint"
VERSION = 1
_RESERVED = ("format", "version", "arch", "arch_config", "name", "num_classes", "class_names", "state_dict")

#: builder name -> callable(**arch_config) -> Segmenter (untrained); extend to make new architectures loadable.
ARCHITECTURES: dict[str, Callable[..., Segmenter]] = {"espnet": build_espnet}


def save_checkpoint(path: str | os.PathLike, model: Segmenter, **extra: object) -> Path:
    """Write ``model`` (and trainer extras) to ``path`` atomically (temp file, fsync, rename; 0666 & ~umask).

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
    return atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a segcal checkpoint (``weights_only=True``); returns the dict described above."""
    path = Path(path)
    ckpt = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a segcal checkpoint (missing format={FORMAT!r}); plain ESPNet state_dicts "
                         "load with segcal.models.load(path)")
    version = ckpt.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt['version']}; this segcal reads up to {VERSION}")
    missing = [k for k in _RESERVED if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks keys {missing}")
    if not isinstance(ckpt["state_dict"], dict):
        raise ValueError(f"checkpoint {path}: 'state_dict' is a {type(ckpt['state_dict']).__name__}, not a dict")
    return ckpt


def load_weights(model: Segmenter, state: dict, source: str) -> Segmenter:
    """Load ``state`` into ``model`` strictly; a mismatch is one ``ValueError`` naming ``source``.

    ``state`` may be a :class:`Segmenter` state_dict (keys ``net.*``, ``head.*`` …) or the bare network's
    (keys without the ``net.`` prefix). Entries of the segmenter's preprocessing (``preprocessor.*``) are optional.
    """
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{source} does not hold a state_dict (a dict of named tensors)")
    own = model.state_dict()
    if not any(k in own for k in state) and any(f"net.{k}" in own for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    optional = [k for k in own if k.startswith("preprocessor.") and k not in state]
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:2])})")
        hint = ""
        if any(k.startswith("preprocessor.") for k in unexpected):
            hint = " (the weights were saved with a normalising preprocess: load with the same `preprocess`)"
        raise ValueError(f"{source} does not fit model {model.name!r}: {', '.join(parts)}{hint}")
    try:
        model.load_state_dict(state, strict=not optional)
    except RuntimeError as err:
        raise ValueError(f"{source} does not fit model {model.name!r}: {str(err).splitlines()[0]}") from err
    return model


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> Segmenter:
    """Rebuild the :class:`Segmenter` described by a checkpoint dict and load its weights strictly."""
    arch = ckpt.get("arch")
    if arch is None:
        raise ValueError(f"checkpoint of model {ckpt.get('name')!r} has arch=None (a wrapped model): segcal cannot "
                         "rebuild its network by itself. Load it together with the code that builds the network: "
                         "segcal.models.load('yourmodel.py:build@CHECKPOINT') (CLI: --model yourmodel.py:build@"
                         "CHECKPOINT), or build it and call segcal.models.load_weights(model, ckpt['state_dict'], ...)")
    if arch not in ARCHITECTURES:
        raise ValueError(f"checkpoint architecture {arch!r} is unknown; known: {sorted(ARCHITECTURES)}")
    if not isinstance(ckpt.get("arch_config"), dict):
        raise ValueError(f"checkpoint 'arch_config' must be a dict, got {type(ckpt.get('arch_config')).__name__}")
    try:
        model = ARCHITECTURES[arch](**ckpt["arch_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint arch_config {ckpt['arch_config']} does not build a {arch}: {err}") from err
    load_weights(model, ckpt["state_dict"], f"checkpoint of {ckpt.get('name')!r}")
    model.name = ckpt.get("name", model.name)
    names = list(ckpt["class_names"])
    if len(names) != model.num_classes:
        raise ValueError(f"checkpoint lists {len(names)} class names but its {arch} model has {model.num_classes} "
                         "outputs (a custom head saved with the base model's weights?)")
    model.class_names = names
    return model.eval().to(device)
