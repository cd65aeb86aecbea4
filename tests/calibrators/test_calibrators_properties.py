"""Hypothesis fuzzing of the calibrator API: random shapes, dtypes and ignore patterns."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcal.calibrators import get_calibrator

FAST = ("ts", "vs", "ets", "histogram", "isotonic")


@st.composite
def dense_problem(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float16, torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    logits = (torch.randn(n, c, h, w, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n, h, w), generator=g)
    ignore = torch.rand(n, h, w, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.9]))
    if ignore.all():
        ignore.view(-1)[0] = False  # at least one valid pixel to fit on
    target[ignore] = 255
    return logits, target, ignore


@settings(max_examples=15)
@given(problem=dense_problem(), name=st.sampled_from(FAST))
def test_fit_transform_survives_any_shape_dtype_and_ignore_pattern(problem, name):
    logits, target, _ = problem
    cal = get_calibrator(name).fit(logits, target)
    out = cal.transform(logits)
    probs = cal.predict_proba(logits)
    assert out.shape == logits.shape and probs.shape == logits.shape
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert torch.allclose(probs.double().sum(1), torch.ones(1, dtype=torch.float64), atol=1e-2)
    if cal.preserves_argmax:
        # only where the logits' top-2 gap is not a rounding-level near-tie
        top2 = logits.double().topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * top2[:, 0].abs().clamp_min(1.0)
        same = out.double().argmax(1) == logits.double().argmax(1)
        assert same[clear].all()


@settings(max_examples=12)
@given(problem=dense_problem(), name=st.sampled_from(("ts", "vs", "ets", "histogram")))
def test_logits_at_ignored_pixels_never_change_the_fit(problem, name):
    logits, target, ignore = problem
    noisy = logits.clone()
    noisy.permute(0, 2, 3, 1)[ignore] = (torch.randn_like(noisy.permute(0, 2, 3, 1)[ignore].float()) * 50).to(
        noisy.dtype)
    a = get_calibrator(name).fit(logits, target)
    b = get_calibrator(name).fit(noisy, target)
    pa, pb = a.get_params(), b.get_params()
    for key, va in pa.items():
        if key.endswith("_") and isinstance(va, torch.Tensor):
            assert torch.equal(va, pb[key]), key
        elif key.endswith("_") and isinstance(va, float):
            assert va == pb[key], key
