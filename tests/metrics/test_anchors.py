"""Anchor libraries on the same flattened valid pixels.

torchmetrics' MulticlassCalibrationError bins with ``bucketize(conf, linspace(0, 1, n+1), right=True) - 1``, i.e.
[b/n, (b+1)/n) bins plus an extra (n+1)-th bucket that holds exactly c = 1.0, and exact edge values sit one bin
higher than in segcal's (b/n, (b+1)/n]. On continuous confidences below 1 both agree; with saturated softmax
outputs (common in float32 segmentation) the c = 1.0 pixels are not pooled with the rest of the top bin, and the
test below shows the values differing. netcal's ECE uses np.digitize-style
[b/n, (b+1)/n) bins too, with 1.0 clipped into the last bin, and agrees away from edges.
"""

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from segcal.metrics import functional as F

from ._reference import flatten_valid, realistic_logits


def _data(seed=0):
    logits, target = realistic_logits(2, 6, 24, 30, seed=seed)
    target[:, :3] = 255
    return logits.double(), target


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchmetrics_ece_and_mce(seed):
    logits, target = _data(seed)
    p, y = flatten_valid(logits, target)
    tm = MulticlassCalibrationError(num_classes=6, n_bins=15, norm="l1")
    tm.update(torch.from_numpy(p), torch.from_numpy(y))
    tmm = MulticlassCalibrationError(num_classes=6, n_bins=15, norm="max")
    tmm.update(torch.from_numpy(p), torch.from_numpy(y))
    assert float(F.ece(logits, target)) == pytest.approx(float(tm.compute()), abs=1e-6)
    assert float(F.mce(logits, target)) == pytest.approx(float(tmm.compute()), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_netcal_ece(seed):
    netcal = pytest.importorskip("netcal.metrics")
    logits, target = _data(seed)
    p, y = flatten_valid(logits, target)
    ref = netcal.ECE(bins=15).measure(p, y)
    assert float(F.ece(logits, target)) == pytest.approx(float(ref), abs=1e-6)


def test_torchmetrics_differs_on_saturated_confidence():
    # Exactly 1.0 and 0.95 share segcal's last bin (0.9, 1]; torchmetrics' right=True bucketize gives 1.0 a bucket
    # of its own past the last edge, so the two pixels are not pooled and its ECE differs.
    probs = torch.tensor([[1.0, 0.0], [0.95, 0.05]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    ours = float(F.ece(probs.T.reshape(1, 2, 1, 2), y.view(1, 1, 2), input="probs", n_bins=10))
    assert ours == pytest.approx(abs(0.5 - 0.975), abs=1e-12)
    tm = MulticlassCalibrationError(num_classes=2, n_bins=10, norm="l1")
    tm.update(probs, y)
    assert float(tm.compute()) == pytest.approx(0.5 * 1.0 + 0.5 * 0.05, abs=1e-6)
    assert np.isfinite(ours)
