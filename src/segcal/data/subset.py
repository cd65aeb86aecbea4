"""Views on datasets of sample dicts: a subset by indices, and index checking shared by the dataset wrappers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def normalize_index(index: object, n: int, owner: str) -> int:
    """``index`` as a non-negative int < n (negative counts from the end), or a clear error naming ``owner``."""
    if isinstance(index, slice):
        raise TypeError(f"{owner} does not support slicing; index one sample at a time")
    i = int(index)  # type: ignore[call-overload]
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {index} out of range for dataset of length {n}")
    return i


class Subset:
    """The samples ``indices`` of a dataset, keeping its descriptive attributes (class names, split, ...).

    Args:
        dataset: indexable of sample dicts.
        indices: which samples, in order.

    Example:
        >>> from segcal.data import SyntheticSegmentation
        >>> Subset.evenly_spaced(SyntheticSegmentation(10, size=(4, 4)), 3).indices
        [0, 4, 9]
    """

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [normalize_index(i, len(dataset), type(self).__name__) for i in indices]
        names = getattr(dataset, "names", None)
        self.names = [names[i] for i in self.indices] if names is not None else None
        for attr in ("class_names", "num_classes", "ignore_index", "split", "dataset_name", "palette",
                     "default_model", "shift_models", "ground_classes"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    @classmethod
    def evenly_spaced(cls, dataset: Any, n: int | None) -> Subset:
        """``n`` evenly spaced samples (all of them when ``n`` is None or ≥ the length): every sequence stays in."""
        total = len(dataset)
        if n is None or n >= total:
            return cls(dataset, range(total))
        return cls(dataset, np.linspace(0, total - 1, n).round().astype(int).tolist())

    def subsets(self) -> dict[str, list[str]]:
        """The dataset's named subsets restricted to the kept samples (empty subsets dropped)."""
        inner = getattr(self.dataset, "subsets", None)
        if not callable(inner) or self.names is None:
            return {}
        kept = set(self.names)
        out = {k: [n for n in v if n in kept] for k, v in inner().items()}
        return {k: v for k, v in out.items() if v}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[normalize_index(i, len(self), type(self).__name__)]]
