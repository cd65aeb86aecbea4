"""Statistics shared by the risk controllers: the λ grid, exact sums, the CRC threshold and binomial intervals.

Exact, order-free sums. Every per-image loss ``L_i(λ) ∈ [0, B]`` is stored as a fixed-point integer
``round(L_i / B · 2^40)`` before it is summed, and set sizes / pixel counts are integers. Integer sums do not depend on
the order of the images, on how they are batched or on how they are spread over ranks, so a streaming fit, a one-shot
fit and a ``torch.distributed`` fit (SUM all-reduce) reach bit-identical thresholds. The quantisation error is at most
``B · 2^-41`` per image, far below anything a finite calibration set can resolve; 2^63 / 2^40 ≈ 8 million images fit in
an int64 sum.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

FIXED_POINT_BITS = 40
_SCALE = float(2 ** FIXED_POINT_BITS)


def make_grid(n_grid: int) -> Tensor:
    """``n_grid`` equally spaced thresholds on [0, 1] (float64), both ends included."""
    if not isinstance(n_grid, int) or isinstance(n_grid, bool) or n_grid < 2:
        raise ValueError(f"`n_grid` must be an int >= 2, got {n_grid!r}")
    return torch.linspace(0.0, 1.0, n_grid, dtype=torch.float64)


def refine_grid(grid: Tensor, index: int, n_grid: int) -> Tensor:
    """``n_grid`` equally spaced points in ``(grid[index-1], grid[index]]`` (the bracket of the coarse threshold)."""
    lo, hi = float(grid[index - 1]), float(grid[index])
    fine = torch.linspace(lo, hi, n_grid + 1, dtype=torch.float64)[1:]
    fine[-1] = hi  # the coarse point itself, bit for bit
    return fine


def to_fixed(losses: Tensor, bound: float) -> Tensor:
    """Per-image losses in [0, bound] (float) → fixed-point int64 (see the module docstring)."""
    return torch.round(losses.double() / bound * _SCALE).to(torch.int64)


def from_fixed(sums: Tensor, bound: float) -> Tensor:
    """Fixed-point int64 sums → float64 loss sums."""
    return sums.double() / _SCALE * bound


def exceed_counts(scores: Tensor, mask: Tensor, grid: Tensor) -> Tensor:
    """Per image and threshold, how many masked entries have ``score > λ_g``.

    Args:
        scores: ``(N, ...)`` float64 scores.
        mask: ``(N, ...)`` bool, entries to count.
        grid: ``(G,)`` sorted float64 thresholds.

    Returns:
        ``(N, G)`` int64 counts, exact (a histogram of ``searchsorted`` positions, then a reverse cumulative sum).
    """
    n, g = scores.shape[0], grid.numel()
    # position = number of grid points strictly below the score, so score > λ_g  ⇔  g < position; entries outside
    # the mask go to a sentinel bin g + 1, and each image gets its own block of g + 2 bins (one bincount, no
    # boolean compaction of the big tensor)
    pos = torch.searchsorted(grid, scores.reshape(n, -1).contiguous(), right=False)
    pos.masked_fill_(~mask.reshape(n, -1), g + 1)
    pos += (torch.arange(n) * (g + 2))[:, None]
    hist = torch.bincount(pos.view(-1), minlength=n * (g + 2)).view(n, g + 2)[:, :g + 1]
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def adjusted_risk(loss_sum: Tensor, n: int, bound: float) -> Tensor:
    r"""CRC's finite-sample upper bound :math:`\frac{n}{n+1}\hat R_n(λ) + \frac{B}{n+1} = (\sum_i L_i(λ) + B)/(n+1)`."""
    return (loss_sum + bound) / (n + 1)


def crc_index(loss_sum: Tensor, n: int, alpha: float, bound: float) -> int | None:
    """Smallest grid index whose adjusted risk is ≤ α (None when no grid point qualifies).

    ``loss_sum`` is non-increasing along the grid for a monotone loss, so the first qualifying index is the infimum
    of the CRC definition restricted to the grid.
    """
    ok = adjusted_risk(loss_sum, n, bound) <= alpha
    idx = torch.nonzero(ok).flatten()
    return int(idx[0]) if idx.numel() else None


def check_monotone(losses: Tensor, grid: Tensor, bound: float, names: list[str] | None = None,
                   tol: float = 1e-9) -> str | None:
    """Explanation of the first per-image loss that rises with λ or leaves [0, bound]; None if all are fine."""
    lo = losses.amin().item() if losses.numel() else 0.0
    hi = losses.amax().item() if losses.numel() else 0.0
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -tol * bound or hi > bound * (1 + tol):
        return (f"the loss must lie in [0, bound={bound}] but took values in [{lo:.6g}, {hi:.6g}]; pass the loss's "
                "true upper bound as `bound` (the guarantee's B/(n+1) term depends on it)")
    rise = losses[:, 1:] - losses[:, :-1]
    bad = torch.nonzero(rise > tol * bound)
    if bad.numel() == 0:
        return None
    i, g = (int(v) for v in bad[0])
    who = names[i] if names is not None and i < len(names) else f"#{i} of its batch"
    return (f"the loss is not non-increasing in the threshold: on image {who} it rises from {losses[i, g]:.6g} at "
            f"λ={grid[g]:.6g} to {losses[i, g + 1]:.6g} at λ={grid[g + 1]:.6g}. Conformal risk control needs "
            "L(λ) to fall (or stay) as λ grows and the prediction set / mask grows; otherwise the threshold that "
            "looks safe on the calibration split carries no guarantee. Rewrite the loss so that a larger set can "
            "never score worse (e.g. a miss fraction instead of a symmetric error)")


def all_reduce_sum(t: Tensor) -> Tensor:
    """In-place SUM all-reduce when torch.distributed is initialised (no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _log_binom_pmf(i: int, n: int, p: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), by an exact float64 sum of the pmf (fsum)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return min(1.0, math.fsum(math.exp(_log_binom_pmf(i, n, p)) for i in range(k + 1)))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion ``k / n``.

    The bounds solve ``P(X ≥ k; p_lo) = δ/2`` and ``P(X ≤ k; p_hi) = δ/2`` with δ = 1 − confidence, by bisection
    on the exact binomial cdf (no scipy needed); they equal ``beta.ppf(δ/2, k, n-k+1)`` and
    ``beta.ppf(1-δ/2, k+1, n-k)``.

    Args:
        k: successes, 0 ≤ k ≤ n. n: trials, ≥ 1. confidence: in (0, 1).

    Returns:
        ``(lower, upper)``.
    """
    if not (isinstance(n, int) and n >= 1 and isinstance(k, int) and 0 <= k <= n):
        raise ValueError(f"need integers 0 <= k <= n and n >= 1, got k={k!r}, n={n!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}")
    d = (1.0 - confidence) / 2.0

    def solve(f: object, target: float) -> float:  # f decreasing in p
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if f(mid) > target:  # type: ignore[operator]
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    lower = 0.0 if k == 0 else solve(lambda p: binom_cdf(k - 1, n, p), 1.0 - d)  # P(X >= k; p) = d
    upper = 1.0 if k == n else solve(lambda p: binom_cdf(k, n, p), d)
    return lower, upper


def mean_interval(values: Tensor, confidence: float = 0.95) -> tuple[float, float]:
    """Normal-approximation interval for the mean of bounded, non-binary per-image losses (labelled as such)."""
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    m = float(values.double().mean())
    if n == 1:
        return m, m
    z = _normal_quantile(0.5 + confidence / 2.0)
    half = z * float(values.double().std()) / math.sqrt(n)
    return m - half, m + half


def _normal_quantile(q: float) -> float:
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(2.0 * q - 1.0, dtype=torch.float64)))
