"""Output heads: turn a network's raw channels into the segmenter's class scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MergeClasses", "SelectChannels"]


class SelectChannels(nn.Module):
    """Keep a subset of output channels, e.g. drop CamVid-ESPNet's "unlabelled" channel 11.

    Dropping a channel of logits equals conditioning the softmax on "not that class": the remaining logits are returned
    unchanged, so ``softmax`` of the output renormalises over the kept classes.

    Args:
        indices: raw channel indices to keep, in output order.

    Shape:
        - Input: ``(N, C_raw, H, W)``.  Output: ``(N, len(indices), H, W)``.

    Example:
        >>> SelectChannels(range(11))(torch.zeros(1, 12, 2, 2)).shape
        torch.Size([1, 11, 2, 2])
    """

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__()
        self.indices = [int(i) for i in indices]
        self.register_buffer("_index", torch.tensor(self.indices, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self._index)


class MergeClasses(nn.Module):
    r"""Merge the raw classes into coarser groups by summing probabilities; returns log-probabilities.

    .. math:: \log q_g = \operatorname{logsumexp}_{k \in g} \log\operatorname{softmax}_{k \in K}(z)_k

    where ``K`` is the union of all groups: raw channels in no group (e.g. Cityscapes' void channel 19) are left out
    of the softmax, which equals summing the full-softmax probabilities and renormalising over the kept classes. The
    output sums to one in probability space, so ``softmax(output) == exp(output)``.

    Args:
        groups: for each output class, the raw channel indices merged into it (disjoint).

    Shape:
        - Input: ``(N, C_raw, H, W)`` logits.  Output: ``(N, len(groups), H, W)`` log-probabilities.

    Example:
        >>> m = MergeClasses([[0, 1], [2]])
        >>> m(torch.zeros(1, 4, 1, 1)).exp().flatten().tolist()  # channel 3 is in no group
        [0.6666666865348816, 0.3333333432878113]
    """

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.groups = [[int(i) for i in g] for g in groups]
        flat = [i for g in self.groups for i in g]
        if any(len(g) == 0 for g in self.groups) or len(set(flat)) != len(flat):
            raise ValueError(f"`groups` must be non-empty and disjoint, got {self.groups}")
        kept = sorted(flat)
        pos = {k: j for j, k in enumerate(kept)}
        self.register_buffer("_kept", torch.tensor(kept, dtype=torch.long), persistent=False)
        self._pos = [torch.tensor([pos[k] for k in g], dtype=torch.long) for g in self.groups]

    def forward(self, x: Tensor) -> Tensor:
        lp = torch.log_softmax(x.index_select(1, self._kept.to(x.device)).float(), dim=1)
        # A logsumexp per group stays finite where summing float32 probabilities would underflow to log(0).
        return torch.cat([torch.logsumexp(lp.index_select(1, i.to(x.device)), 1, keepdim=True) for i in self._pos], 1)
