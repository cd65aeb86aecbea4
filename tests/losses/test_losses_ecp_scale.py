"""ECP's β scale against MbLS's PenaltyEntropy (mean over pixels and classes), issue 12 item 8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.losses import EntropyPenaltyLoss


def mbls_penalty_entropy(logits: np.ndarray, target: np.ndarray, alpha: float, ignore_index: int) -> float:
    """float64 re-derivation of MbLS's PenaltyEntropy: CE − α · mean_{pixels, classes}(−p log p), p clamped."""
    z = logits.transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    y = target.reshape(-1)
    keep = y != ignore_index
    z, y = z[keep], y[keep]
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[np.arange(len(y)), y].mean()
    p = np.clip(np.exp(logp), 1e-8, 1 - 1e-8)
    return float(ce - alpha * (-p * np.log(p)).mean())


@pytest.mark.parametrize("c", [3, 11])
def test_mean_entropy_reduction_matches_mbls_and_sum_is_c_times_stronger(c):
    g = torch.Generator().manual_seed(c)
    z = torch.randn(2, c, 5, 6, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (2, 5, 6), generator=g)
    y[0, 0] = 255
    alpha = 0.7
    ref = mbls_penalty_entropy(z.numpy(), y.numpy(), alpha, 255)
    ours = EntropyPenaltyLoss(beta=alpha, entropy_reduction="mean")(z, y)
    assert float(ours) == pytest.approx(ref, abs=1e-6)
    # the default (paper, entropy summed over classes) with β = α / C is the same loss
    assert float(EntropyPenaltyLoss(beta=alpha / c)(z, y)) == pytest.approx(ref, abs=1e-6)
    assert float(EntropyPenaltyLoss(beta=alpha)(z, y)) != pytest.approx(ref, abs=1e-3)
    with pytest.raises(ValueError, match="entropy_reduction"):
        EntropyPenaltyLoss(entropy_reduction="max")
