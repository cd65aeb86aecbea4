"""Label-boundary band of a dense label map (for boundary vs interior calibration)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from segcal._checks import check_tensor


def boundary_mask(target: Tensor, width: int, ignore_index: int | None = 255) -> Tensor:
    r"""Pixels within Chebyshev distance ``width`` of a pixel with a different valid label.

    .. math::
        \mathrm{boundary}(i) = \mathrm{valid}(i) \wedge \exists j:\ \|i - j\|_\infty \le k,\
        \mathrm{valid}(j),\ y_j \ne y_i

    Ignore pixels neither are boundary pixels nor create a boundary (a class region touching void is interior), and
    the image border is not a boundary. Implemented with one max-pool and one min-pool of the label map (window
    ``2k + 1``), so there are no Python loops over pixels.

    Args:
        target: integer labels.
        width: band half-width ``k >= 1`` in pixels.
        ignore_index: label that marks pixels without a label (``None``: every pixel is labelled).

    Shape:
        - target: :math:`(N, H, W)`
        - output: :math:`(N, H, W)` bool

    Returns:
        Boolean mask of boundary-band pixels.

    References:
        Band evaluation as in Ding et al., "Local Temperature Scaling for Probability Calibration", ICCV 2021,
        arXiv:2008.05105.

    Example:
        >>> y = torch.tensor([[[0, 0, 1, 1]]])
        >>> boundary_mask(y, 1).int().tolist()
        [[[0, 1, 1, 0]]]
    """
    target = check_tensor(target, "target")
    if target.ndim != 3:
        raise ValueError(f"`target` must have shape (N, H, W), got {tuple(target.shape)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"`width` must be a positive int (pixels), got {width!r}")
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    # float32 represents labels exactly up to 2**24, far above any class count.
    y = target.to(torch.float32)
    hi = torch.where(valid, y, -1.0).unsqueeze(1)
    lo = torch.where(valid, -y, -(2.0**24)).unsqueeze(1)
    k = 2 * width + 1
    mx = F.max_pool2d(hi, k, stride=1, padding=width).squeeze(1)
    mn = -F.max_pool2d(lo, k, stride=1, padding=width).squeeze(1)
    return valid & ((mx > y) | (mn < y))
