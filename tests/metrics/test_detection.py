import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from segcal.metrics import DetectionMetrics
from segcal.metrics import functional as F
from segcal.metrics.detection import _n_bins, _score_key

from ._reference import realistic_logits


def _sk(scores, positive, valid=None):
    s, y = scores.double().numpy().ravel(), positive.numpy().ravel()
    if valid is not None:
        keep = valid.numpy().ravel()
        s, y = s[keep], y[keep]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr95 = fpr[np.searchsorted(tpr, 0.95 - 1e-12)]
    return roc_auc_score(y, s), average_precision_score(y, s), fpr95


def _realistic_scores(kind, seed=0):
    """Error detection on synthetic segmentation: scores from the detectors we ship, positive = mispredicted."""
    logits, target = realistic_logits(2, 8, 48, 64, seed=seed, scale=6.0)
    p = torch.softmax(logits, 1)
    scores = {
        "msp": 1.0 - p.amax(1),
        "neg_msp": -p.amax(1),
        "entropy": -(p * p.clamp_min(1e-30).log()).sum(1),
        "max_logit": -logits.amax(1),
        "energy": -torch.logsumexp(logits, 1),
    }[kind]
    return scores.float(), logits.argmax(1) != target


@pytest.mark.parametrize("kind", ["msp", "neg_msp", "entropy", "max_logit", "energy"])
def test_exact_equals_sklearn_and_binned_within_1e3(kind):
    scores, positive = _realistic_scores(kind)
    valid = torch.rand(scores.shape, generator=torch.Generator().manual_seed(1)) > 0.1
    auc, ap, fpr95 = _sk(scores, positive, valid)
    ex = DetectionMetrics(exact=True)
    b = DetectionMetrics()
    for i in range(2):
        ex.update(scores[i:i + 1], positive[i:i + 1], valid[i:i + 1])
        b.update(scores[i:i + 1], positive[i:i + 1], valid[i:i + 1])
    e, bo = ex.compute(), b.compute()
    assert float(e["auroc"]) == pytest.approx(auc, abs=1e-9)
    assert float(e["ap"]) == pytest.approx(ap, abs=1e-9)
    assert float(e["fpr95"]) == pytest.approx(fpr95, abs=1e-9)
    assert float(bo["auroc"]) == pytest.approx(auc, abs=1e-3)
    assert float(bo["ap"]) == pytest.approx(ap, abs=1e-3)
    assert float(bo["fpr95"]) == pytest.approx(fpr95, abs=1e-3)


def test_ties_and_score_range_mode():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (3, 10, 10), generator=g).float() / 19.0  # heavy ties, in [0, 1]
    positive = torch.rand(3, 10, 10, generator=g) < 0.3 + 0.4 * scores
    auc, ap, fpr95 = _sk(scores, positive)
    for m in [DetectionMetrics(exact=True), DetectionMetrics(score_range=(0.0, 1.0), n_thresholds=1000),
              DetectionMetrics()]:
        m.update(scores, positive)
        out = m.compute()
        assert float(out["auroc"]) == pytest.approx(auc, abs=1e-9)
        assert float(out["ap"]) == pytest.approx(ap, abs=1e-9)
        assert float(out["fpr95"]) == pytest.approx(fpr95, abs=1e-9)


def test_score_key_is_monotone_over_the_whole_float32_range():
    f32 = torch.finfo(torch.float32)
    s = torch.tensor([-math.inf, -f32.max, -1e30, -3e7, -5.0, -1.0, -0.999, -1e-3, -1e-20, -1e-38, -0.0, 0.0, 1e-38,
                      1e-30, 1e-20, 1e-9, 0.5, 0.501, 1.0, 7.0, 1e6, 2.0**24, 3e9, 1e30, f32.max, math.inf])
    k = _score_key(s, 2**19, None)
    assert torch.all(k[1:] >= k[:-1])
    assert int(k.min()) >= 0 and int(k.max()) < _n_bins(2**19, None)
    assert k[10] == k[11]  # -0.0 and 0.0 are the same score
    others = [i for i in range(len(s)) if i != 10]
    assert len(set(k[others].tolist())) == len(others)  # every other magnitude has its own bin
    kr = _score_key(torch.tensor([-5.0, 0.0, 0.25, 1.0, 9.0]), 4, (0.0, 1.0))
    assert kr.tolist() == [0, 0, 1, 3, 3]


def _saturated_entropy(seed=0):
    """Entropies of a saturated softmax (most far below 2**-40) and its errors, as a confident model gives."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 8, 32, 32, generator=g) * 40
    p = torch.softmax(logits, 1)
    ent = -(p * p.clamp_min(1e-45).log()).sum(1)
    noisy = torch.randint(0, 8, (4, 32, 32), generator=g)
    target = torch.where(torch.rand(4, 32, 32, generator=g) < 0.9, logits.argmax(1), noisy)
    return ent, logits.argmax(1) != target


def _large_scores(seed=0):
    """Scores >= 2**24 (e.g. energies of unnormalised flows) with AUROC ~0.87."""
    g = torch.Generator().manual_seed(seed)
    s = 2.0**24 * torch.exp(torch.randn(2, 32, 32, generator=g))
    return s, torch.rand(2, 32, 32, generator=g) < torch.sigmoid(2 * torch.log(s / 2.0**24))


@pytest.mark.parametrize("case", ["entropy", "large", "negative_large", "tiny_negative"])
def test_issue_cases_match_sklearn_within_bound(case):
    """Issue 12 item 3: saturated entropies (< 2**-40) and scores >= 2**24 used to collapse into one bin."""
    if case == "entropy":
        s, y = _saturated_entropy()
        assert float((s.abs() < 2.0**-40).float().mean()) > 0.1  # the failing regime of the issue
    else:
        s, y = _large_scores()
        if case == "negative_large":
            s, y = -s, ~y
        elif case == "tiny_negative":
            s = -1.0 / s  # in (-2**-20, 0): same order as the large scores
    auc, ap, fpr95 = _sk(s, y)
    m = DetectionMetrics()
    m.update(s, y)
    out = m.compute()
    for key, ref in (("auroc", auc), ("ap", ap), ("fpr95", fpr95)):
        err = abs(float(out[key]) - ref)
        assert err <= float(out[f"{key}_error_bound"]), key
        assert err < 1e-3, key
    if case == "large":
        assert auc > 0.85  # the old code reported 0.5 here


def test_infinite_scores_are_ranked_at_the_ends():
    s, y = _large_scores(seed=1)
    s = s.clone()
    s[0, 0, :4] = math.inf
    s[0, 1, :4] = -math.inf
    y[0, 0, :4] = True
    y[0, 1, :4] = False
    f64 = torch.finfo(torch.float64).max
    ref = _sk(s.double().nan_to_num(posinf=f64, neginf=-f64), y)  # sklearn refuses inf
    for m in (DetectionMetrics(), DetectionMetrics(exact=True)):
        m.update(s, y)
        out = m.compute()
        for key, r in zip(("auroc", "ap", "fpr95"), ref):
            assert abs(float(out[key]) - r) <= float(out[f"{key}_error_bound"]) + 1e-12


def test_exact_mode_reports_zero_bounds():
    s, y = _realistic_scores("msp")
    m = DetectionMetrics(exact=True)
    m.update(s, y)
    out = m.compute()
    assert float(out["auroc_error_bound"]) == float(out["ap_error_bound"]) == float(out["fpr95_error_bound"]) == 0


_float_scores = st.one_of(
    st.floats(allow_nan=False, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-42, 2.0**24, math.inf, -math.inf]),
)


@given(st.lists(st.tuples(_float_scores, st.booleans()), min_size=2, max_size=300),
       st.sampled_from([2**9, 2**10, 2**12, 2**19]))
def test_true_value_lies_within_the_reported_bound(pairs, n_thresholds):
    y = torch.tensor([b for _, b in pairs])
    assume(bool(y.any()) and not bool(y.all()))
    s = torch.tensor([v for v, _ in pairs], dtype=torch.float32)
    f64 = torch.finfo(torch.float64).max
    ref = _sk(s.double().nan_to_num(posinf=f64, neginf=-f64).view(1, 1, -1), y.view(1, 1, -1))
    m = DetectionMetrics(n_thresholds=n_thresholds)
    m.update(s.view(1, 1, -1), y.view(1, 1, -1))
    out = m.compute()
    for key, r in zip(("auroc", "ap", "fpr95"), ref):
        assert abs(float(out[key]) - r) <= float(out[f"{key}_error_bound"]), key


def test_per_image_average_skips_one_class_images():
    scores, positive = _realistic_scores("msp", seed=2)
    positive[1] = False  # image 1 has no positive -> skipped
    m = DetectionMetrics(exact=True, per_image=True)
    m.update(scores, positive)
    out = m.compute()
    auc0, ap0, f0 = _sk(scores[0], positive[0])
    assert float(out["n_images"]) == 1
    assert float(out["auroc_per_image"]) == pytest.approx(auc0, abs=1e-9)
    assert float(out["ap_per_image"]) == pytest.approx(ap0, abs=1e-9)
    assert float(out["fpr95_per_image"]) == pytest.approx(f0, abs=1e-9)
    mb = DetectionMetrics(per_image=True)
    mb.update(scores, positive)
    assert float(mb.compute()["auroc_per_image"]) == pytest.approx(auc0, abs=1e-3)


def test_functional_and_curves():
    scores, positive = _realistic_scores("entropy", seed=3)
    auc, ap, fpr95 = _sk(scores, positive)
    assert float(F.auroc(scores, positive, exact=True)) == pytest.approx(auc, abs=1e-9)
    assert float(F.average_precision(scores, positive, exact=True)) == pytest.approx(ap, abs=1e-9)
    assert float(F.fpr_at_tpr(scores, positive, exact=True)) == pytest.approx(fpr95, abs=1e-9)
    m = DetectionMetrics()
    m.update(scores, positive)
    c = m.curves()
    assert float(torch.trapezoid(c["tpr"], c["fpr"])) == pytest.approx(float(m.compute()["auroc"]), abs=1e-12)
    assert c["fpr"][0] == 0 and c["tpr"][-1] == 1 and c["fpr"][-1] == 1
    assert torch.all(c["tpr"][1:] >= c["tpr"][:-1])
    assert c["recall"].shape == c["precision"].shape


def test_missing_class_gives_nan_and_state_is_constant():
    m = DetectionMetrics()
    size = m.hist_pos.numel()
    m.update(torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    assert math.isnan(float(m.compute()["auroc"]))
    assert m.hist_pos.numel() == size


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"scores": torch.rand(2, 4), "positive": torch.zeros(2, 4, dtype=torch.bool)}, "scores"),
    ({"scores": torch.rand(1, 2, 2), "positive": torch.zeros(1, 2, 3, dtype=torch.bool)}, "positive"),
    ({"scores": torch.rand(1, 2, 2), "positive": torch.zeros(1, 2, 2)}, "positive"),
    ({"scores": torch.tensor([[[float("nan")]]]), "positive": torch.zeros(1, 1, 1, dtype=torch.bool)}, "NaN"),
    ({"scores": torch.rand(1, 2, 2), "positive": torch.zeros(1, 2, 2, dtype=torch.bool),
      "valid": torch.ones(1, 2, 2)}, "valid"),
])
def test_bad_detection_input(kwargs, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        DetectionMetrics().update(**kwargs)


def test_bad_detection_args():
    with pytest.raises(ValueError, match="score_range"):
        DetectionMetrics(score_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="n_thresholds"):
        DetectionMetrics(n_thresholds=1)
