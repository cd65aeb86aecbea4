"""Hypothesis property tests: batch splits, ignore_index, permutations, ranges, calibrated data."""

import itertools
import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcal.metrics import CalibrationMetrics
from segcal.metrics import functional as F

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALUES = ["ece", "mce", "oe", "accuracy", "ace", "cw_ece", "nll", "brier", "miou", "image_ece"]


@st.composite
def batches(draw, max_n=5):
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(2, 5))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 50.0]))
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, c, (n, h, w), generator=g)
    ignore = torch.rand(n, h, w, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    return logits, target.masked_fill(ignore, 255)


def _run(chunks, c, **kw):
    m = CalibrationMetrics(c, **kw)
    for lg, tg in chunks:
        m.update(lg, tg)
    return m


def _same(a, b):
    for k in VALUES:
        x, y = float(a[k]), float(b[k])
        assert (math.isnan(x) and math.isnan(y)) or x == y, (k, x, y)


@SETTINGS
@given(batches(), st.data())
def test_any_batch_split_gives_identical_states(batch, data):
    logits, target = batch
    n = logits.shape[0]
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    one = _run([(logits, target)], logits.shape[1], boundary_width=1, ace_resolution=1024)
    many = _run([(logits[a:b], target[a:b]) for a, b in itertools.pairwise(bounds)], logits.shape[1],
                boundary_width=1, ace_resolution=1024)
    for k in ["bin_count", "bin_correct", "fine_count", "fine_correct", "cw_pos", "confmat", "image_count"]:
        assert torch.equal(one.metric_state[k], many.metric_state[k]), k
    # real-valued sums are rounded to 2**-48 once per batch
    _close(one.compute(), many.compute(), 1e-12)


def _close(a, b, tol):
    for k in VALUES:
        x, y = float(a[k]), float(b[k])
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol * max(1.0, abs(x)), (k, x, y)


@SETTINGS
@given(batches())
def test_ignore_index_equals_prefiltering(batch):
    logits, target = batch
    valid = target != 255
    if not valid.any():
        return
    # Pre-filter: the valid pixels as one (1, C, 1, P) image; compare pooled (not per-image) values.
    lg = logits.permute(1, 0, 2, 3)[:, valid].unsqueeze(0).unsqueeze(2)
    tg = target[valid].view(1, 1, -1)
    a = F.calibration_metrics(logits, target, ace_resolution=1024)
    b = F.calibration_metrics(lg, tg, ace_resolution=1024)
    for k in ["ece", "mce", "oe", "accuracy", "ace", "cw_ece", "nll", "brier", "miou"]:
        assert abs(float(a[k]) - float(b[k])) <= 1e-12, k


@SETTINGS
@given(batches(), st.integers(0, 2**31 - 1))
def test_pixel_permutation_invariance(batch, seed):
    logits, target = batch
    n, c, h, w = logits.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(h * w, generator=g)
    lg = logits.reshape(n, c, -1)[:, :, perm].reshape(n, c, h, w)
    tg = target.reshape(n, -1)[:, perm].reshape(n, h, w)
    img = torch.randperm(n, generator=g)
    _close(F.calibration_metrics(logits, target, ace_resolution=1024),
           F.calibration_metrics(lg[img], tg[img], ace_resolution=1024), 1e-12)


@SETTINGS
@given(batches())
def test_values_in_range(batch):
    logits, target = batch
    out = F.calibration_metrics(logits, target, ace_resolution=1024)
    if not (target != 255).any():
        assert all(math.isnan(float(out[k])) for k in VALUES)
        return
    for k in ["ece", "mce", "oe", "accuracy", "ace", "cw_ece", "miou", "image_ece"]:
        assert -1e-12 <= float(out[k]) <= 1 + 1e-12, k
    assert float(out["ece"]) <= float(out["mce"]) + 1e-12
    assert float(out["oe"]) <= float(out["ece"]) + 1e-12
    assert 0.0 <= float(out["brier"]) <= 2.0 + 1e-12
    assert float(out["nll"]) >= -1e-12


def test_calibrated_synthetic_data_has_ece_near_zero():
    # Labels drawn from the predicted distribution itself: perfectly calibrated by construction.
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(8, 4, 64, 64, generator=g)
    p = torch.softmax(logits, 1)
    target = torch.multinomial(p.permute(0, 2, 3, 1).reshape(-1, 4), 1, generator=g).view(8, 64, 64)
    out = F.calibration_metrics(logits, target)
    # sampling noise with 32k pixels in 15 bins is ~1e-2; a miscalibrated model is far away
    assert float(out["ece"]) < 0.01
    assert float(out["ace"]) < 0.01
    assert float(out["cw_ece"]) < 0.01
    hot = F.calibration_metrics(logits * 3, target)
    assert float(hot["ece"]) > 0.1
    assert np.isfinite(float(out["nll"]))
