"""``segcal.models.load``: a Segmenter from a model spec (published name, checkpoint, TorchScript, python callable)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from segcal._io import safe_torch_load

from .adapters import wrap
from .checkpoint import FORMAT, load_checkpoint, load_weights, model_from_checkpoint
from .pretrained import PRETRAINED, build_espnet, flush_subnormals, load_pretrained, load_weights_strict
from .segmenter import Segmenter, meta_parameters

__all__ = ["available_models", "load", "resolve_device"]

_MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".pts", ".jit", ".torchscript")
_ATTR = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_CALLABLE_RE = re.compile(rf"^(?P<target>.+):(?P<attr>{_ATTR})$")
_MODULE_RE = re.compile(rf"^{_ATTR}$")
_SPEC_FORMS = ("a published name ({names}), a segcal checkpoint, a TorchScript file, a raw ESPNet state_dict, "
               "'path/to/file.py:callable', 'package.module:callable', or any of the last two followed by "
               "'@weights.pt'")


def available_models() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(PRETRAINED)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU; anything else → ``torch.device(device)`` (ValueError if invalid)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from err


def _espnet_from_state_dict(state: dict, path: Path) -> Segmenter:
    w = state.get("conv.conv.weight")
    if not isinstance(w, Tensor) or w.ndim != 4 or "encoder.level1.conv.weight" not in state:
        raise ValueError(f"{path} holds a state_dict that is neither a segcal checkpoint nor an ESPNet state_dict; "
                         "load the weights of your own network with 'yourmodel.py:build@" + str(path) + "'")
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
    load_weights_strict(seg.net, flush_subnormals(state), f"ESPNet state_dict {path}")
    return seg


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code (``<archive>/code/...``); ``torch.save`` zips do not."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; users still ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # corrupt archive, unsupported ops: one line
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ValueError(f"cannot read TorchScript model {path}: {type(err).__name__}: {first[:200]}") from err


def _import_file(file: Path) -> object:
    mod_name = f"segcal_user_model_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import model file {file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)  # the file may import its neighbours
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(mod_name, None)
        raise ValueError(f"importing model file {file} failed: {type(err).__name__}: {err}") from err
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _resolve_callable(target: str, attr: str, spec: str) -> Callable[[], object]:
    if target.endswith(".py") or os.sep in target or "/" in target:
        file = Path(target)
        if not file.is_file():
            raise FileNotFoundError(f"model spec {spec!r}: Python file not found: {file}")
        module = _import_file(file)
    elif _MODULE_RE.match(target):
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"model spec {spec!r}: cannot import module {target!r} ({err}); is it installed or on "
                             "PYTHONPATH?") from err
    else:
        raise ValueError(f"model spec {spec!r}: {target!r} is neither a .py file nor a module name")
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model spec {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"model spec {spec!r}: {attr} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[return-value]


def _from_callable(target: str, attr: str, spec: str, preprocess: str | Callable, output: Callable | None
                   ) -> Segmenter:
    fn = _resolve_callable(target, attr, spec)
    if isinstance(fn, type) and issubclass(fn, Segmenter):
        raise TypeError(f"model spec {spec!r}: {attr} is the Segmenter class; point at a function returning a model")
    try:
        model = fn() if not isinstance(fn, nn.Module) else fn
    except TypeError as err:
        raise TypeError(f"model spec {spec!r}: calling {attr}() failed ({err}); the callable must take no required "
                        "arguments") from err
    if isinstance(model, Segmenter):
        return model
    if isinstance(model, nn.Module):
        name = f"{Path(target).name if target.endswith('.py') else target}:{attr}"
        return wrap(model, preprocess=preprocess, output=output, name=name)
    raise TypeError(f"model spec {spec!r}: {attr}() returned a {type(model).__name__}; it must return a "
                    "torch.nn.Module or a segcal Segmenter")


def _split_weights(spec: str) -> tuple[str, Path] | None:
    """``'model-spec@weights.pt'`` → ``('model-spec', Path('weights.pt'))`` when the right side is an existing file."""
    if "@" not in spec or Path(spec).is_file():
        return None
    left, right = spec.rsplit("@", 1)
    if not left or not right:
        return None
    if not Path(right).is_file():
        if right.endswith(_MODEL_SUFFIXES):
            raise FileNotFoundError(f"model spec {spec!r}: weights file not found: {right}")
        return None
    return left, Path(right)


def _load_spec(spec: str, preprocess: str | Callable, output: Callable | None) -> Segmenter:
    if spec in PRETRAINED:
        return load_pretrained(spec)
    weights = _split_weights(spec)
    if weights is not None:
        base = _load_spec(weights[0], preprocess, output)
        return _apply_weights(base, weights[1])
    path = Path(spec)
    if path.is_file():
        return _load_file(path, preprocess, output)
    m = _CALLABLE_RE.match(spec)
    if m is not None and (m["target"].endswith(".py") or _MODULE_RE.match(m["target"])
                          or "/" in m["target"] or os.sep in m["target"]):
        return _from_callable(m["target"], m["attr"], spec, preprocess, output)
    if os.sep in spec or "/" in spec or path.suffix in _MODEL_SUFFIXES:
        raise FileNotFoundError(f"model file not found: {path}")
    raise ValueError(f"unknown model {spec!r}; a model spec is " + _SPEC_FORMS.format(names=available_models()))


def _load_file(path: Path, preprocess: str | Callable, output: Callable | None) -> Segmenter:
    if path.suffix == ".py":
        raise ValueError(f"model spec {str(path)!r} is a Python file: name the callable that builds the model, "
                         f"e.g. '{path}:build'")
    if _is_torchscript(path):
        return wrap(_load_torchscript(path), preprocess=preprocess, output=output, name=path.stem)
    obj = safe_torch_load(path, "model file")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return model_from_checkpoint(load_checkpoint(path))
    if isinstance(obj, dict):
        return _espnet_from_state_dict(obj, path)
    if isinstance(obj, nn.Module):  # unreachable with weights_only, kept for clarity of the message below
        return wrap(obj, preprocess=preprocess, output=output, name=path.stem)
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a segcal checkpoint, a TorchScript model or a "
                     "state_dict")


def _apply_weights(model: Segmenter, path: Path) -> Segmenter:
    """Load a segcal checkpoint's (or a raw state_dict's) weights into an already built model."""
    obj = safe_torch_load(path, "weights file")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = load_checkpoint(path)
        if int(ckpt["num_classes"]) != model.num_classes:
            raise ValueError(f"checkpoint {path} has {ckpt['num_classes']} classes but the model built by the spec "
                             f"predicts {model.num_classes}")
        load_weights(model, ckpt["state_dict"], f"checkpoint {path}")
        model.class_names = [str(c) for c in ckpt["class_names"]]
        model.name = str(ckpt.get("name") or model.name)
        return model
    if isinstance(obj, dict):
        load_weights(model, obj, f"weights file {path}")
        return model
    raise ValueError(f"weights file {path} holds a {type(obj).__name__}, not a segcal checkpoint or a state_dict")


def load(spec: str | os.PathLike | nn.Module, device: str | torch.device | None = None, *,
         preprocess: str | Callable = "imagenet", output: Callable[[object], Tensor] | None = None) -> Segmenter:
    """Load a segmentation model as a :class:`Segmenter` in eval mode.

    Args:
        spec: one of

            - a published name (``"espnet-camvid"``, ``"espnet-cityscapes"``; weights read from
              ``<data root>/espnet_pretrained/decoder/``, see :func:`segcal.data.data_root`);
            - a segcal checkpoint written by :func:`~segcal.models.checkpoint.save_checkpoint` (or ``segcal train``);
            - a TorchScript file (``torch.jit.save``), wrapped with :func:`~segcal.models.wrap`;
            - a raw published ESPNet ``.pth`` state_dict;
            - ``"path/to/file.py:callable"`` or ``"package.module:callable"``: ``callable()`` (no arguments) returns
              an ``nn.Module`` (wrapped with :func:`~segcal.models.wrap`; the class count comes from one dummy
              forward pass) or a ready :class:`Segmenter` (used as is);
            - any of the above followed by ``"@weights.pt"``: build the model, then load the weights of a segcal
              checkpoint (e.g. a fine-tuned wrapped model, which cannot be rebuilt from the checkpoint alone) or of a
              raw state_dict (keys of the network, with or without the ``net.`` prefix);
            - an ``nn.Module`` / :class:`Segmenter` object.
        device: where to put the model; ``None`` (default) = CUDA when available, else CPU.
        preprocess: for wrapped models (TorchScript, callables): ``"imagenet"`` (RGB /255, ImageNet mean/std),
            ``"none"`` (float RGB 0–255) or a callable (see :func:`~segcal.models.wrap`).
        output: for wrapped models, a callable mapping the model's raw output to logits ``(N, C, h, w)``.

    Returns:
        Segmenter with ``num_classes``, ``class_names``, ``predict_logits`` … (see :class:`Segmenter`).

    Raises:
        ValueError: unknown name (the message lists the accepted forms), an unreadable, truncated or malicious file
            (one line; files are read with ``weights_only=True``), weights that do not fit the model.
        FileNotFoundError: weights / file missing (the message names the path and the data root).
        TypeError: a callable that returns neither an ``nn.Module`` nor a Segmenter.

    Example:
        >>> import tempfile
        >>> from segcal.models import build_espnet, save_checkpoint
        >>> p = save_checkpoint(tempfile.mkdtemp() + "/m.pt", build_espnet())
        >>> load(p, "cpu").num_classes
        11
    """
    dev = resolve_device(device)
    if isinstance(spec, Segmenter):
        seg = spec
    elif isinstance(spec, nn.Module):
        seg = wrap(spec, preprocess=preprocess, output=output)
    elif isinstance(spec, (str, os.PathLike)):
        seg = _load_spec(os.fspath(spec), preprocess, output)
    else:
        raise TypeError(f"`spec` must be a model name, a path or a 'file.py:callable' string, got "
                        f"{type(spec).__name__}")
    meta = meta_parameters(seg)
    if meta:
        raise ValueError(f"model {seg.name!r} has weights on the meta device (no data): {meta[:3]}")
    return seg.eval().to(dev)
