"""The method contract shared by every calibrator and detector: parameters, cloning, one file format, registries.

scikit-learn's estimator conventions, applied to dense per-pixel methods:

* ``__init__`` only stores its arguments under the same names; :meth:`Estimator.get_params` reads them back through
  the constructor signature, :meth:`Estimator.set_params` sets them, :func:`clone` builds an unfitted copy (nested
  estimators such as Selective Scaling's ``base`` are cloned too).
* learned attributes end in ``_`` and are listed in ``_learned``; :func:`check_is_fitted` raises the one
  :class:`NotFittedError` of segcal when they are missing.
* class-level declarations tell a protocol what a method needs, so no caller branches on a method's name:
  ``name`` (registry key), ``needs_images`` (fit/transform want the RGB images), ``needs_features`` (the decoder
  features), ``requires_fit`` (False for closed-form scores such as MSP).
* :meth:`Estimator.save` / :meth:`Estimator.load`: one format for every method — a plain dict
  ``{"format": "segcal.estimator", "version", "kind", "name", "class", "params", "state"}`` of tensors and Python
  scalars, read with ``torch.load(weights_only=True)`` (no pickled code is ever executed), written atomically.
* every concrete subclass that declares ``name`` registers itself (``__init_subclass__``) in the :class:`Registry` of
  its family (``segcal.calibrators.CALIBRATORS``, ``segcal.detectors.DETECTORS``); a class defined anywhere — a test
  file, a user's script — is reachable by name as soon as it is defined. Installed packages can also expose methods
  through the entry-point groups ``segcal.calibrators`` / ``segcal.detectors`` (loaded on first lookup).
* :meth:`Estimator.pretrained`: a fitted instance shipped with segcal for a model (``segcal/assets/<name>-<model>.pt``),
  or None.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata, resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from segcal._io import atomic_torch_save, safe_torch_load

FORMAT = "segcal.estimator"
VERSION = 1

E = TypeVar("E", bound="Estimator")
T = TypeVar("T")


class NotFittedError(ValueError, AttributeError):
    """Raised when a method is used before ``fit`` (subclass of ValueError and AttributeError, as scikit-learn's)."""


def normalize_name(name: str) -> str:
    """The one name normalisation of segcal's registries: case-insensitive, ``_`` ≡ ``-``, surrounding spaces dropped.

    Example:
        >>> normalize_name("Max_Logit")
        'max-logit'
    """
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("_", "-")


class Registry(Mapping[str, type]):
    """Name → class mapping of one family of methods, filled by the classes themselves.

    Keys are the classes' declared ``name``; lookups (``registry[key]``, ``in``, :meth:`create`) normalise the key with
    :func:`normalize_name` and also accept the class name (``"TemperatureScaling"``).

    Args:
        kind: ``"calibrator"`` or ``"detector"`` (used in messages and in saved files).
        group: entry-point group scanned once, on the first lookup, for methods of installed plugins.
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._classes: dict[str, type] = {}
        self._plugins_loaded = False

    # -- registration --------------------------------------------------------------------------------------------
    def register(self, cls: type) -> type:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"{cls.__qualname__}.name must be a non-empty string, got {name!r}")
        key = normalize_name(name)
        old = self._classes.get(key)
        if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                                        cls.__qualname__):
            raise ValueError(f"{self.kind} name {name!r} of {cls.__module__}.{cls.__qualname__} is already taken by "
                             f"{old.__module__}.{old.__qualname__}")
        self._classes[key] = cls  # a re-executed definition (module reload) replaces the old class
        return cls

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.group):
            try:
                obj = ep.load()  # importing the module registers its classes
            except Exception as exc:  # a broken plugin must not break segcal
                import warnings

                warnings.warn(f"segcal: could not load {self.kind} plugin {ep.name!r} ({ep.value}): {exc}",
                              stacklevel=2)
                continue
            if isinstance(obj, type) and issubclass(obj, Estimator) and "name" in obj.__dict__:
                self.register(obj)

    # -- lookup --------------------------------------------------------------------------------------------------
    def _find(self, name: str) -> type | None:
        key = normalize_name(name)
        cls = self._classes.get(key)
        if cls is None:
            cls = next((c for c in self._classes.values() if normalize_name(c.__name__) == key), None)
        return cls

    def resolve(self, name: str) -> type:
        """The class registered as ``name`` (normalised; the class name is accepted too).

        Raises:
            ValueError: for an unknown name, listing the known ones.
        """
        cls = self._find(name)
        if cls is None:
            self._load_plugins()
            cls = self._find(name)
        if cls is None:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}")
        return cls

    def create(self, name: str, **params: Any) -> Any:
        """An unfitted instance of the class registered as ``name`` with hyperparameters ``params``."""
        return self.resolve(name)(**params)

    def __getitem__(self, name: str) -> type:
        try:
            return self.resolve(name)
        except ValueError as exc:
            raise KeyError(str(exc)) from None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.resolve(name)
        except ValueError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter([c.name for c in self._classes.values()])

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"


# ------------------------------------------------------------------------------------------------ value codecs
_VALUE_TYPES: dict[str, type] = {}


def register_value_type(tag: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: a non-estimator parameter type that :meth:`Estimator.save` may store.

    The class needs ``to_dict() -> dict`` (tensors and Python scalars only) and a classmethod ``from_dict(dict)``.
    """
    def deco(cls: type[T]) -> type[T]:
        _VALUE_TYPES[tag] = cls
        cls._segcal_value_tag = tag  # type: ignore[attr-defined]
        return cls
    return deco


def _encode(value: Any, where: str) -> Any:
    """Turn a parameter / learned value into tensors, scalars and containers that ``weights_only`` loading accepts."""
    if isinstance(value, Estimator):
        return {"__estimator__": value._to_dict(with_state=value.is_fitted())}
    tag = getattr(type(value), "_segcal_value_tag", None)
    if tag is not None:
        return {"__value__": tag, "data": value.to_dict()}
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        out = [_encode(v, where) for v in value]
        return tuple(out) if isinstance(value, tuple) else out
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cannot save {where}: a dict with non-string keys")
        return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"cannot save {where} of type {type(value).__name__}: only tensors, numbers, strings, lists, "
                    "dicts, segcal estimators and registered value types are stored")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__estimator__" in value:
            return Estimator._from_dict(value["__estimator__"])
        if "__value__" in value:
            tag = value["__value__"]
            if tag not in _VALUE_TYPES:
                raise ValueError(f"unknown stored value type {tag!r}")
            return _VALUE_TYPES[tag].from_dict(value["data"])  # type: ignore[attr-defined]
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_decode(v) for v in value]
        return tuple(out) if isinstance(value, tuple) else out
    return value


_REGISTRIES: dict[str, Registry] = {}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------- the base
class Estimator:
    """Base class of calibrators and detectors (see the module docstring for the contract).

    Subclasses store every ``__init__`` argument under its own name, list learned attributes in ``_learned`` and
    may override :meth:`_get_state` / :meth:`_set_state` for state that is not a plain attribute.
    """

    #: Registry key (``get_calibrator(name)`` / ``get_detector(name)``); declaring it registers the class.
    name: ClassVar[str]
    #: ``fit`` / ``transform`` / ``score`` want ``images`` (N, 3, H, W) float in [0, 1].
    needs_images: ClassVar[bool] = False
    #: ``fit`` / ``score`` want ``features`` (N, F, h, w): the decoder features that feed the classifier.
    needs_features: ClassVar[bool] = False
    #: False for closed-form methods usable without ``fit`` (MSP, energy, ...).
    requires_fit: ClassVar[bool] = True
    #: Learned attributes (ending in ``_``) saved by :meth:`save`; their presence means "fitted".
    _learned: ClassVar[tuple[str, ...]] = ()
    #: The family registry; set by the family base class (Calibrator, Detector).
    _registry: ClassVar[Registry]
    _kind: ClassVar[str] = "estimator"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registry = cls.__dict__.get("_registry")
        if registry is not None:  # a family base: remember its registry for loading
            _REGISTRIES[registry.kind] = registry
            cls._kind = registry.kind
        if "name" in cls.__dict__ and not cls.__name__.startswith("_") and hasattr(cls, "_registry"):
            cls._registry.register(cls)

    # -- parameters ----------------------------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """Hyperparameters, as passed to ``__init__`` (read back through the constructor signature).

        Args:
            deep: also list the parameters of nested estimators as ``outer__inner`` (scikit-learn's convention).
        """
        out: dict[str, Any] = {}
        for k in self._param_names():
            try:
                v = getattr(self, k)
            except AttributeError:
                raise AttributeError(f"{type(self).__name__}.__init__ takes {k!r} but does not store it as "
                                     f"self.{k}; the contract needs every constructor argument stored") from None
            out[k] = v
            if deep and isinstance(v, Estimator):
                out.update({f"{k}__{kk}": vv for kk, vv in v.get_params(deep=True).items()})
        return out

    def set_params(self: E, **params: Any) -> E:
        """Set hyperparameters (``outer__inner`` reaches into a nested estimator); returns self."""
        valid = self.get_params()
        nested: dict[str, dict[str, Any]] = {}
        for k, v in params.items():
            head, sep, rest = k.partition("__")
            if head not in valid:
                raise ValueError(f"invalid parameter {head!r} for {type(self).__name__}; valid: {sorted(valid)}")
            if sep:
                nested.setdefault(head, {})[rest] = v
            else:
                setattr(self, k, v)
        for head, sub in nested.items():
            inner = getattr(self, head)
            if not isinstance(inner, Estimator):
                raise ValueError(f"parameter {head!r} of {type(self).__name__} is not an estimator; cannot set "
                                 f"{sorted(sub)}")
            inner.set_params(**sub)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitted state --------------------------------------------------------------------------------------------
    def is_fitted(self) -> bool:
        """True when every learned attribute is present (always True for methods that need no fit)."""
        if not self._learned:
            return not self.requires_fit
        return all(_has(self, k) for k in self._learned)

    def _check_fitted(self) -> None:
        check_is_fitted(self)

    def _get_state(self) -> dict[str, Any]:
        """Learned state to save: the ``_learned`` attributes (tensors, numbers, containers, nested estimators)."""
        return {k: getattr(self, k) for k in self._learned}

    def _set_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_get_state` (validate what it reads: the file may come from anywhere)."""
        missing = set(self._learned) - set(state)
        if missing:
            raise ValueError(f"missing learned state {sorted(missing)}")
        for k in self._learned:
            setattr(self, k, state[k])

    # -- persistence ---------------------------------------------------------------------------------------------
    def _to_dict(self, *, with_state: bool) -> dict[str, Any]:
        cls = type(self)
        registered = getattr(cls, "name", None)
        if registered is None or cls._registry._find(registered) is not cls:
            raise TypeError(f"{cls.__qualname__} is not a registered {self._kind} (declare a class-level `name`), so "
                            "a saved file could not be loaded back as this class")
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": self._kind, "name": cls.name,
                             "class": cls.__name__,
                             "params": {k: _encode(v, f"parameter {k!r}") for k, v in self.get_params().items()},
                             "state": None}
        if with_state and self.is_fitted():
            d["state"] = {k: _encode(v, f"learned {k!r}") for k, v in self._get_state().items()}
        return d

    @staticmethod
    def _from_dict(d: Any) -> Estimator:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a saved segcal calibrator or detector")
        if not isinstance(d.get("version"), int) or d["version"] > VERSION:
            raise ValueError(f"format version {d.get('version')!r} is not supported by this segcal (≤ {VERSION})")
        registry = _REGISTRIES.get(d.get("kind"))  # type: ignore[arg-type]
        if registry is None or not isinstance(d.get("name"), str):
            raise ValueError(f"unknown method kind {d.get('kind')!r}")
        cls = registry.resolve(d["name"])
        params, state = d.get("params"), d.get("state")
        if not isinstance(params, dict) or not (state is None or isinstance(state, dict)):
            raise ValueError("malformed params / state")
        obj = cls(**{k: _decode(v) for k, v in params.items()})
        if state is not None:
            obj._set_state({k: _decode(v) for k, v in state.items()})
        return obj

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write hyperparameters and learned state (the format of the module docstring), atomically.

        The file is written to a temporary name in the same folder and renamed, so an interrupted save never leaves
        a truncated file under ``path``. An unfitted estimator saves its parameters only.
        """
        atomic_torch_save(self._to_dict(with_state=True), Path(path))

    @classmethod
    def load(cls: type[E], path: str | os.PathLike[str]) -> E:
        """Load a method written by :meth:`save` (``torch.load(weights_only=True)``: no code is unpickled).

        Called on a family base (``Calibrator.load``), any method of that family loads; on a concrete class, the file
        must hold that class (or a subclass).

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: one line naming ``path`` if the file is truncated, not a segcal method, or of another class.
        """
        path = Path(path)
        d = safe_torch_load(path, f"saved segcal {cls._kind}")
        try:
            d = cls._upgrade(d)
            obj = Estimator._from_dict(d)
        except Exception as exc:
            raise ValueError(f"{path}: not a valid saved segcal method ({_one_line(exc)})") from None
        if not isinstance(obj, cls):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj

    @classmethod
    def _upgrade(cls, d: Any) -> Any:
        """Hook: turn an older file layout into the current one (default: unchanged)."""
        return d

    # -- shipped fits --------------------------------------------------------------------------------------------
    @classmethod
    def pretrained(cls: type[E], model_name: str) -> E | None:
        """The instance fitted for ``model_name`` that ships with segcal, or None.

        Looks for ``segcal/assets/<name>-<model_name>.pt`` (a file written by :meth:`save`).

        Example:
            >>> from segcal.detectors import DETECTORS
            >>> DETECTORS["msp"].pretrained("espnet-camvid") is None
            True
        """
        name = cls.__dict__.get("name")
        if name is None or not isinstance(model_name, str) or not re.fullmatch(r"[\w.+-]+", model_name):
            return None
        target = resources.files("segcal") / "assets" / f"{name}-{model_name}.pt"
        if not target.is_file():
            return None
        with resources.as_file(target) as p:
            return cls.load(p)


def _has(obj: object, name: str) -> bool:
    try:
        getattr(obj, name)
    except AttributeError:
        return False
    return True


def check_is_fitted(est: Estimator) -> None:
    """Raise :class:`NotFittedError` (naming the class) if ``est`` has not been fitted."""
    if not est.is_fitted():
        raise NotFittedError(f"this {type(est).__name__} instance is not fitted yet; call fit(...) first (or load a "
                             "fitted one)")


def clone(est: E) -> E:
    """Unfitted copy with the same hyperparameters; estimator-valued parameters (``base``) are cloned too.

    Other parameters are shared, not copied (scikit-learn's ``clone(safe=False)`` semantics for non-estimators).
    """
    if not isinstance(est, Estimator):
        raise TypeError(f"clone expects a segcal calibrator or detector, got {type(est).__name__}")
    params = {k: clone(v) if isinstance(v, Estimator) else v for k, v in est.get_params().items()}
    return type(est)(**params)


__all__ = ["Estimator", "NotFittedError", "Registry", "check_is_fitted", "clone", "normalize_name",
           "register_value_type"]
