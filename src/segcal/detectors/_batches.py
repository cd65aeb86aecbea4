"""Normalise the many shapes a "stream of batches" can take into ``(logits, target, features)`` triples.

Accepted per-batch items: a ``LogitsStore``-style dict with keys ``logits``, ``target`` and optionally ``features``;
or a tuple ``(logits, target)`` / ``(logits, target, features)``. The stream itself may be an iterable, a zero-arg
callable returning a fresh iterator, or a ``LogitsStore`` (see :func:`from_store`); all but a one-shot iterator can
be walked more than once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor

Batch = tuple[Tensor, "Tensor | None", "Tensor | None"]
BatchSource = Iterable[Any] | Callable[[], Iterable[Any]]


def unpack_batch(item: Any) -> Batch:
    if isinstance(item, dict):
        if "logits" not in item:
            raise ValueError(f"a batch dict must have a 'logits' key, got keys {sorted(item)}")
        return item["logits"], item.get("target"), item.get("features")
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise TypeError(f"`batches` must yield dicts with 'logits'/'target'[/'features'] or tuples (logits, target"
                    f"[, features]), got {type(item).__name__}")


def from_store(batches: Any, *, features: bool = False) -> Any:
    """A ``LogitsStore``-like object (has a ``batches(...)`` method; iterating the store itself yields single
    images, not batches) becomes a zero-arg callable streaming it once per pass; anything else is unchanged."""
    method = getattr(batches, "batches", None)
    if callable(method):
        return (lambda: method(features=True)) if features else method
    return batches


def check_source(batches: BatchSource, passes: int = 1) -> None:
    """Raise if ``batches`` is not a stream, or is a one-shot iterator while ``passes > 1``."""
    if callable(batches) and not isinstance(batches, Iterable):
        return
    if not isinstance(batches, Iterable):
        raise TypeError(f"`batches` must be an iterable or a zero-arg callable, got {type(batches).__name__}")
    if passes > 1 and iter(batches) is batches:
        raise TypeError("`batches` is a one-shot iterator but several passes are needed; pass a list or a "
                        "zero-arg callable returning a fresh iterator (e.g. lambda: store.batches(...))")


def iterate(batches: BatchSource, *, passes: int = 1) -> Iterator[Batch]:
    """One pass over ``batches``; ``passes`` only decides whether a one-shot iterator is acceptable."""
    check_source(batches, passes)
    source = batches() if callable(batches) and not isinstance(batches, Iterable) else batches
    for item in source:
        yield unpack_batch(item)
