"""Calibration / evaluation data for the risk controllers, image names kept (for subsets and error messages).

Accepted forms (the same as the calibrators'): ``(logits (N,C,H,W), target (N,H,W))`` tensors; an object with a
``batches()`` method (a :class:`~segcal.data.LogitsStore`); a zero-argument callable returning a fresh iterator of
batches; a re-iterable (list / tuple) of batches; a one-shot iterator (only when a single pass is enough). A batch is a
tuple ``(logits, target)`` or a dict with ``"logits"``, ``"target"`` and optionally ``"names"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor

from segcal._checks import check_logits_target


class Source:
    """Re-iterable, validated view of labelled data yielding ``(logits, target, names)``.

    Args:
        data: logits tensor or a source of batches (see the module docstring).
        target: labels when ``data`` is a tensor.
        ignore_index: label that marks void pixels.
        batch_size: images per batch when reading tensors or a store.
    """

    def __init__(self, data: object, target: object = None, *, ignore_index: int | None, batch_size: int = 4) -> None:
        self.ignore_index = ignore_index
        self.num_classes: int | None = None
        self.one_shot = False
        self._used = False
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor) and target is None:
            data, target = data
        if isinstance(data, Tensor):
            if target is None:
                raise ValueError("`target` is required when `logits` is a tensor")
            logits, target = check_logits_target(data, target, ignore_index)
            if logits.shape[0] == 0:
                raise ValueError("`logits` is empty (N=0)")
            n = logits.shape[0]
            self.num_classes = logits.shape[1]

            def factory() -> Iterator[object]:
                for i in range(0, n, batch_size):
                    j = min(n, i + batch_size)
                    yield {"logits": logits[i:j], "target": target[i:j], "names": [str(k) for k in range(i, j)]}

            self._factory: Callable[[], Iterator[object]] = factory
            return
        if target is not None:
            raise ValueError("`target` must be inside the batches when the data is not a tensor")
        batches = getattr(data, "batches", None)
        recorded = getattr(data, "ignore_index", ignore_index)
        if callable(batches) and recorded != ignore_index:
            raise ValueError(f"the data records ignore_index={recorded!r} but the controller has ignore_index="
                             f"{ignore_index!r}; pass ignore_index={recorded!r} (void labels travel with the data)")
        if callable(batches):
            self._factory = lambda: batches(batch_size=batch_size)
        elif isinstance(data, Iterator):
            self.one_shot = True
            it = data
            self._factory = lambda: it
        elif callable(data):
            self._factory = data  # type: ignore[assignment]
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
            self._factory = lambda: iter(data)  # type: ignore[arg-type]
        else:
            raise TypeError("the data must be (logits, target) tensors, a LogitsStore, an iterable of batches or a "
                            f"callable returning an iterator of batches, got {type(data).__name__}")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        if self.one_shot and self._used:
            raise ValueError("this needs a second pass over the data but got a one-shot iterator; pass a list of "
                             "batches, a LogitsStore or a zero-argument callable returning a fresh iterator (or "
                             "refine=False for a single-pass fit)")
        self._used = True
        seen = 0
        for item in self._factory():
            logits, target, names = _unpack(item)
            logits, target = check_logits_target(logits, target, self.ignore_index, self.num_classes)
            if self.num_classes is None:
                self.num_classes = logits.shape[1]
            if names is None:
                names = [str(k) for k in range(seen, seen + logits.shape[0])]
            elif len(names) != logits.shape[0]:
                raise ValueError(f"a batch has {logits.shape[0]} images but {len(names)} names")
            seen += logits.shape[0]
            yield logits, target, [str(n) for n in names]
        if not seen:
            raise ValueError("the data is empty: no batches")


def _unpack(item: object) -> tuple[Any, Any, list[str] | None]:
    if isinstance(item, dict):
        if "logits" not in item or "target" not in item:
            raise ValueError(f"a batch dict needs keys 'logits' and 'target', got {sorted(item)}")
        if item["target"] is None:
            raise ValueError("a batch has no labels (target is None); conformal calibration and evaluation need "
                             "labelled images")
        return item["logits"], item["target"], item.get("names")
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], list(item[2]) if len(item) == 3 else None
    raise TypeError("each batch must be a tuple (logits, target[, names]) or a dict with 'logits' and 'target', "
                    f"got {type(item).__name__}")
