"""Score conventions, identities and input validation of the simple detectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcal.detectors import (
    DETECTORS,
    NotFittedError,
    SelectiveDetector,
    SMLStatistics,
    StandardizedMaxLogit,
    energy,
    entropy,
    fit_sml_statistics,
    get_detector,
    max_logit,
    msp,
    standardized_max_logit,
)

SIMPLE = {"msp": msp, "max_logit": max_logit, "entropy": entropy, "energy": energy}


def _confident_vs_flat(c: int = 5) -> torch.Tensor:
    z = torch.zeros(1, c, 1, 2)
    z[0, 2, 0, 0] = 8.0  # confident, correct-looking pixel; pixel (0, 1) is flat
    return z


@pytest.mark.parametrize("name", sorted(SIMPLE))
def test_confident_pixel_scores_lower_than_flat(name):
    s = SIMPLE[name](_confident_vs_flat())
    assert s.shape == (1, 1, 2)
    assert s[0, 0, 0] < s[0, 0, 1]


def test_sml_confident_pixel_scores_lower_than_flat():
    s = standardized_max_logit(_confident_vs_flat(), [1.0] * 5, [2.0] * 5)
    assert s[0, 0, 0] < s[0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_forms(dtype):
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(3, 6, 4, 5, generator=g)).to(dtype)
    p = z.double().softmax(1)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(msp(z).double(), 1 - p.amax(1), atol=atol, rtol=0)
    torch.testing.assert_close(max_logit(z).double(), -z.double().amax(1), atol=atol, rtol=0)
    torch.testing.assert_close(entropy(z).double(), -(p * p.log()).sum(1), atol=atol * 10, rtol=0)
    torch.testing.assert_close(energy(z), -torch.logsumexp(z, 1))
    torch.testing.assert_close(energy(z, temperature=2.5), -2.5 * torch.logsumexp(z / 2.5, 1))
    assert energy(z).dtype == dtype


def test_entropy_is_zero_when_saturated_and_log_c_when_flat():
    z = torch.tensor([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    e = entropy(z)
    assert e[0, 0, 0] == 0.0 and torch.isfinite(e).all()
    assert math.isclose(e[0, 0, 1].item(), math.log(3), rel_tol=1e-6)


def test_half_precision_is_computed_in_float32():
    z = torch.randn(1, 4, 3, 3).half()
    assert msp(z).dtype == torch.float32
    torch.testing.assert_close(energy(z), -torch.logsumexp(z.float(), 1))


def test_sml_against_float64_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 5, 6)) * 3
    mu, sd = rng.normal(size=4), rng.uniform(0.5, 2, size=4)
    pred, top = z.argmax(1), z.max(1)
    ref = -(top - mu[pred]) / sd[pred]
    out = standardized_max_logit(torch.from_numpy(z), torch.from_numpy(mu), torch.from_numpy(sd))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


def _sml_data(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(n, 4, 7, 9, generator=g) + 50  # large offset: cancellation would show in sum-of-squares
    y = z.argmax(1)
    flip = torch.rand(y.shape, generator=g) < 0.3
    y[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.1] = 255
    return z, y


def test_sml_statistics_match_one_shot_reference_and_streaming_equals_one_shot():
    z, y = _sml_data()
    top, pred = z.double().max(1)
    keep = pred == y
    ref_mean = torch.stack([top[keep & (pred == c)].mean() for c in range(4)])
    ref_std = torch.stack([top[keep & (pred == c)].std(unbiased=False) for c in range(4)])
    one = fit_sml_statistics([(z, y)])
    streamed = fit_sml_statistics([(z[i : i + 1], y[i : i + 1]) for i in range(len(z))])
    dicts = fit_sml_statistics([{"logits": z[:2], "target": y[:2]}, {"logits": z[2:], "target": y[2:]}])
    for stats in (one, streamed, dicts):
        torch.testing.assert_close(stats.class_mean_, ref_mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(stats.class_std_, ref_std, rtol=0, atol=1e-10)
        assert stats.count_.tolist() == [int((keep & (pred == c)).sum()) for c in range(4)]
    assert not one.fallback_.any()


def test_sml_statistics_ignore_index_excluded():
    z, y = _sml_data()
    y2 = y.clone()
    pred = z.argmax(1)
    y2[pred == 0] = 255  # class 0 never counted -> fallback to pooled statistics
    stats = fit_sml_statistics([(z, y2)])
    assert stats.fallback_.tolist() == [True, False, False, False]
    assert stats.count_[0] == 0
    top = z.double().amax(1)[(pred == y2)]
    torch.testing.assert_close(stats.class_mean_[0], top.mean(), rtol=0, atol=1e-10)
    torch.testing.assert_close(stats.class_std_[0], top.std(unbiased=False), rtol=0, atol=1e-10)


def test_sml_statistics_callable_source_and_errors():
    z, y = _sml_data()
    stats = fit_sml_statistics(lambda: iter([(z, y)]))
    assert stats.class_mean_.shape == (4,)
    with pytest.raises(ValueError, match="empty"):
        fit_sml_statistics([])
    with pytest.raises(ValueError, match="no correctly predicted"):
        fit_sml_statistics([(z, torch.full_like(y, 255))])
    with pytest.raises(ValueError, match="target"):
        SMLStatistics().update(z, y[:, :3])
    with pytest.raises(ValueError, match="C=3"):
        SMLStatistics().update(z, y).update(z[:, :3], y.clamp(max=2))
    with pytest.raises(NotFittedError, match="not fitted"):
        SMLStatistics().standardize(z)


def test_sml_module_fit_and_roundtrip_dict():
    z, y = _sml_data()
    det = StandardizedMaxLogit().fit([(z, y)])
    stats = fit_sml_statistics([(z, y)])
    torch.testing.assert_close(det.score(z), standardized_max_logit(z, stats.class_mean_, stats.class_std_))
    back = SMLStatistics.from_dict(stats.to_dict())
    torch.testing.assert_close(back.standardize(z), stats.standardize(z))
    with pytest.raises(NotFittedError, match="not fitted"):
        StandardizedMaxLogit().score(z)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: msp(torch.zeros(2, 3, 4)), ValueError, r"\(N, C, H, W\)"),
        (lambda: entropy(np.zeros((1, 2, 2, 2))), TypeError, "torch.Tensor"),
        (lambda: max_logit(torch.zeros(1, 3, 2, 2, dtype=torch.long)), TypeError, "floating"),
        (lambda: energy(torch.full((1, 3, 2, 2), float("nan"))), ValueError, "NaN"),
        (lambda: energy(torch.zeros(1, 3, 2, 2), temperature=0), ValueError, "temperature"),
        (lambda: msp(torch.zeros(1, 1, 2, 2)), ValueError, "at least 2"),
        (lambda: standardized_max_logit(torch.zeros(1, 3, 2, 2), [0, 0], [1, 1]), ValueError, "C=3"),
        (lambda: standardized_max_logit(torch.zeros(1, 2, 2, 2), [0, 0], [1, 0]), ValueError, "class_std"),
        (lambda: get_detector("nope"), ValueError, "unknown detector"),
        (lambda: SelectiveDetector(object()), TypeError, "misprediction_proba"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_registry_names_and_uniform_score_interface():
    shipped = {n for n, cls in DETECTORS.items() if cls.__module__.startswith("segcal.")}
    assert shipped == {"msp", "max_logit", "entropy", "energy", "sml", "flowenedet-u", "flowenedet-c",
                              "selective"}
    z = torch.randn(2, 3, 4, 4)
    for name, fn in SIMPLE.items():
        torch.testing.assert_close(get_detector(name).score(z), fn(z))
    torch.testing.assert_close(get_detector("max-logit").score(z), max_logit(z))
    assert get_detector("sml", class_mean=[0.0] * 3, class_std=[1.0] * 3).score(z).shape == (2, 4, 4)


def test_selective_wraps_misprediction_proba():
    class Fake:
        def misprediction_proba(self, logits):
            return 1 - logits.softmax(1).amax(1)

    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(get_detector("selective", calibrator=Fake()).score(z), msp(z))
    with pytest.raises(NotFittedError, match="no calibrator"):
        SelectiveDetector().score(z)
