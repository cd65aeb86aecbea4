"""Risk controllers: equations against float64 references, input handling, streaming = one-shot, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from segcal.calibrators import TemperatureScaling
from segcal.conformal import (
    CoverageRiskControl,
    FNRControl,
    NotFittedError,
    RiskControl,
    class_scores,
    clopper_pearson,
    evaluate,
    image_curves,
)
from segcal.data import LogitsStore

from ._synthetic import make_data


@pytest.fixture(scope="module")
def data():
    return make_data(80, seed=3)


def _ref_losses(z, y, lam, *, kind, eps=0.1, k=1, ignore=255):
    """Float64 per-image losses straight from the definitions, one image and one pixel set at a time."""
    p = torch.softmax(z.double(), 1)
    out = []
    for i in range(z.shape[0]):
        valid = y[i] != ignore
        if kind == "fnr":
            pos = valid & (y[i] == k)
            mask = p[i, k] >= 1 - lam
            out.append(0.0 if pos.sum() == 0 else 1.0 - float((mask & pos).sum()) / float(pos.sum()))
            continue
        sets = p[i] >= 1 - lam
        yy = torch.where(valid, y[i], 0)
        miss = (~sets.gather(0, yy[None])[0]) & valid
        frac = float(miss.sum()) / max(int(valid.sum()), 1)
        out.append(float(frac > eps) if kind == "indicator" else frac)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["indicator", "fraction", "fnr"])
def test_threshold_is_the_crc_infimum_over_the_grid(data, kind) -> None:
    z, y = data
    ctrl = (FNRControl(alpha=0.15, class_index=1, n_grid=41, refine=False) if kind == "fnr" else
            CoverageRiskControl(alpha=0.15, epsilon=0.1, loss=kind, n_grid=41, refine=False)).fit(z, y)
    n = z.shape[0]
    ok = [lam for lam in torch.linspace(0, 1, 41, dtype=torch.float64).tolist()
          if (float(_ref_losses(z, y, lam, kind=kind).sum()) + 1) / (n + 1) <= 0.15]
    assert ctrl.threshold_ == pytest.approx(min(ok), abs=1e-12)
    ref = _ref_losses(z, y, ctrl.threshold_, kind=kind)
    assert ctrl.empirical_risk_ == pytest.approx(float(ref.mean()), abs=1e-9)
    assert ctrl.risk_bound_ == pytest.approx((float(ref.sum()) + 1) / (n + 1), abs=1e-9)
    assert ctrl.risk_bound_ <= 0.15
    assert ctrl.lambda_hat_ == ctrl.threshold_


def test_refinement_is_the_infimum_over_the_fine_grid(data) -> None:
    z, y = data
    coarse = CoverageRiskControl(alpha=0.15, loss="fraction", n_grid=11, refine=False).fit(z, y)
    fine = CoverageRiskControl(alpha=0.15, loss="fraction", n_grid=11).fit(z, y)
    assert coarse.threshold_ - 0.1 < fine.threshold_ <= coarse.threshold_
    # brute force on the full fine grid (spacing 1/(10*11)) gives the same point
    full = CoverageRiskControl(alpha=0.15, loss="fraction", n_grid=111, refine=False).fit(z, y)
    assert fine.threshold_ == pytest.approx(full.threshold_, abs=1e-12)
    assert fine.risk_bound_ <= 0.15


def test_predict_sets_and_set_size_match_the_threshold(data) -> None:
    z, y = data
    ctrl = CoverageRiskControl(alpha=0.1).fit(z, y)
    sets = ctrl.predict(z)
    assert sets.shape == z.shape and sets.dtype == torch.bool
    assert torch.equal(sets, torch.softmax(z.double(), 1) >= 1 - ctrl.threshold_)
    assert torch.equal(ctrl.set_size(z), sets.sum(1))
    valid = y != 255
    assert ctrl.set_size_ == pytest.approx(float(sets.sum(1)[valid].double().mean()), abs=1e-12)
    fnr = FNRControl(alpha=0.1, class_index=2).fit(z, y)
    mask = fnr.predict(z)
    assert mask.shape == y.shape and mask.dtype == torch.bool
    assert fnr.set_size_ == pytest.approx(float(mask[valid].double().mean()), abs=1e-12)


def test_aps_sets_are_nested_never_empty_and_full_at_one() -> None:
    p = torch.softmax(torch.randn(3, 5, 4, 4) * 3, 1)
    s = class_scores(p, "aps")
    assert torch.all((s >= 0) & (s <= 1))
    assert torch.all((s <= 0.0).sum(1) >= 1)  # the top class has score 0
    assert torch.all(s <= 1.0)
    prev = torch.zeros_like(s, dtype=torch.bool)
    for lam in torch.linspace(0, 1, 21).tolist():
        cur = s <= lam
        assert torch.all(cur | ~prev)
        prev = cur
    # lower-end APS: class k is in iff the mass ranked above it is <= lambda
    order = p.argsort(1, descending=True)
    assert torch.allclose(s.gather(1, order[:, 1:2]), p.gather(1, order[:, :1]).double())


def test_streaming_equals_one_shot_and_store(data, tmp_path) -> None:
    z, y = data
    ref = CoverageRiskControl(alpha=0.1, epsilon=0.05, batch_size=80).fit(z, y)
    batches = [(z[i:i + 7], y[i:i + 7]) for i in range(0, 80, 7)]
    streamed = CoverageRiskControl(alpha=0.1, epsilon=0.05).fit(batches)
    gen = CoverageRiskControl(alpha=0.1, epsilon=0.05, refine=False).fit(iter(batches))
    coarse = CoverageRiskControl(alpha=0.1, epsilon=0.05, refine=False).fit(z, y)
    shuffled = CoverageRiskControl(alpha=0.1, epsilon=0.05).fit(lambda: iter(batches[::-1]))
    store = LogitsStore.create(tmp_path / "s", {"model": "m", "dataset": "d", "split": "val", "num_classes": 4})
    for i in range(80):
        store.write(f"im{i}", z[i].half().float(), y[i])  # stores keep float16 logits
    store.finalize()
    zs = z.half().float()
    from_store = CoverageRiskControl(alpha=0.1, epsilon=0.05).fit(LogitsStore(tmp_path / "s"))
    from_half = CoverageRiskControl(alpha=0.1, epsilon=0.05).fit(zs, y)
    for other in (streamed, shuffled):
        assert other.threshold_ == ref.threshold_
        assert other.risk_bound_ == ref.risk_bound_
        assert other.set_size_ == ref.set_size_
    assert gen.threshold_ == coarse.threshold_
    assert from_store.threshold_ == from_half.threshold_
    with pytest.raises(ValueError, match="ignore_index=255"):
        CoverageRiskControl(ignore_index=None).fit(LogitsStore(tmp_path / "s"))


def test_one_shot_iterator_needs_refine_false(data) -> None:
    z, y = data
    with pytest.raises(ValueError, match="one-shot"):
        CoverageRiskControl(alpha=0.2).fit(iter([(z, y)]))


def test_ignore_index_is_respected(data) -> None:
    z, y = data
    base = CoverageRiskControl(alpha=0.1, refine=False).fit(z, y)
    z2 = z.clone()
    void = (y == 255)[:, None].expand_as(z)
    z2[void] = torch.randn(int(void.sum())) * 50  # arbitrary logits on void pixels change nothing
    assert CoverageRiskControl(alpha=0.1, refine=False).fit(z2, y).threshold_ == base.threshold_
    y3 = y.clone()
    y3[y == 255] = 7
    other = CoverageRiskControl(alpha=0.1, ignore_index=7, refine=False).fit(z, y3)
    assert other.threshold_ == base.threshold_ and other.set_size_ == base.set_size_
    f1 = FNRControl(alpha=0.1, class_index=0, refine=False).fit(z2, y)
    assert f1.threshold_ == FNRControl(alpha=0.1, class_index=0, refine=False).fit(z, y).threshold_


def test_fnr_empty_images_count_zero_or_are_skipped(data) -> None:
    z, y = data
    y = y.clone()
    y[:40][y[:40] == 1] = 0  # half the images have no class-1 pixel
    all_imgs = FNRControl(alpha=0.1, class_index=1).fit(z, y)
    with_k = FNRControl(alpha=0.1, class_index=1, count_empty=False).fit(z, y)
    assert all_imgs.n_calibration_ == 80 and with_k.n_calibration_ == 40
    assert with_k.threshold_ >= all_imgs.threshold_  # the conditional statement is harder to meet


def test_calibrator_composition(data) -> None:
    z, y = data
    zo, yo = make_data(40, seed=11)
    ts = TemperatureScaling().fit(zo, yo)
    composed = CoverageRiskControl(alpha=0.1, calibrator=ts, refine=False).fit(z, y)
    manual = CoverageRiskControl(alpha=0.1, refine=False).fit(z / ts.temperature_, y)
    assert composed.threshold_ == manual.threshold_
    assert torch.equal(composed.predict(z), manual.predict(z / ts.temperature_))
    with pytest.raises(TypeError, match="calibrator"):
        CoverageRiskControl(calibrator=object()).fit(z, y)
    with pytest.raises(ValueError, match="calibrator_split"):
        CoverageRiskControl(calibrator=TemperatureScaling(), calibrator_split=1.0).fit(z, y)


def test_unfitted_calibrator_is_fitted_on_its_own_share_of_images(data, tmp_path) -> None:
    from segcal.conformal import load
    from segcal.conformal.risk import _in_calibrator_part

    z, y = data
    ctrl = CoverageRiskControl(alpha=0.1, calibrator=TemperatureScaling(), calibrator_split=0.4,
                               refine=False).fit(z, y)
    part = torch.tensor([_in_calibrator_part(str(i), 0.4) for i in range(80)])
    assert 15 < int(part.sum()) < 50
    assert not hasattr(ctrl.calibrator, "temperature_")  # the given calibrator stays unfitted; a copy is fitted
    ts = TemperatureScaling().fit(z[part], y[part])
    assert ctrl.calibrator_.temperature_ == pytest.approx(ts.temperature_, rel=1e-5)  # TS tolerance, batching
    manual = CoverageRiskControl(alpha=0.1, calibrator=ctrl.calibrator_, refine=False).fit(z[~part], y[~part])
    assert ctrl.threshold_ == manual.threshold_ and ctrl.n_calibration_ == int((~part).sum())
    batches = [(z[i:i + 8], y[i:i + 8], [str(k) for k in range(i, i + 8)]) for i in range(0, 80, 8)]
    again = CoverageRiskControl(alpha=0.1, calibrator=TemperatureScaling(), calibrator_split=0.4,
                                refine=False).fit(lambda: iter(batches[::-1]))  # the split follows names, not order
    assert again.n_calibration_ == ctrl.n_calibration_
    assert again.calibrator_.temperature_ == pytest.approx(ctrl.calibrator_.temperature_, rel=1e-5)
    ctrl.save(tmp_path / "c.pt")
    back = load(str(tmp_path / "c.pt"))
    assert back.calibrator_.temperature_ == ctrl.calibrator_.temperature_
    assert torch.equal(back.predict(z), ctrl.predict(z))


def _miss_fraction(pred_set, target, valid):
    hit = pred_set.gather(1, target[:, None])[:, 0]
    return ((~hit) & valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def test_generic_loss_matches_builtin_and_refuses_non_monotone(data) -> None:
    z, y = data
    generic = RiskControl(_miss_fraction, alpha=0.1, n_grid=51).fit(z, y)
    builtin = CoverageRiskControl(alpha=0.1, loss="fraction", n_grid=51).fit(z, y)
    assert generic.threshold_ == builtin.threshold_
    assert generic.risk_bound_ == pytest.approx(builtin.risk_bound_, abs=1e-7)  # the user loss is float32

    def set_size_error(pred_set, target, valid):  # |set size - 1|: rises once sets get bigger than one class
        return ((pred_set.sum(1) - 1).abs().double() * valid).flatten(1).sum(1) / valid.flatten(1).sum(1) / 3
    with pytest.raises(ValueError, match=r"not non-increasing.*rises from"):
        RiskControl(set_size_error, alpha=0.1, n_grid=21).fit(z, y)
    with pytest.raises(ValueError, match=r"\[0, bound=1"):
        RiskControl(lambda s, t, v: _miss_fraction(s, t, v) * 5, alpha=0.1, n_grid=21).fit(z, y)
    assert RiskControl(lambda s, t, v: _miss_fraction(s, t, v) * 5, alpha=0.5, bound=5.0, n_grid=21).fit(z, y)
    with pytest.raises(ValueError, match="shape"):
        RiskControl(lambda s, t, v: torch.zeros(3), n_grid=5).fit(z, y)


def test_infeasible_alpha_warns_and_uses_full_sets() -> None:
    z, y = make_data(5, seed=0)
    with pytest.warns(RuntimeWarning, match="no threshold meets"):
        ctrl = CoverageRiskControl(alpha=0.1).fit(z, y)  # (0 + 1)/6 > 0.1: impossible with 5 images
    assert ctrl.threshold_ == 1.0 and not ctrl.feasible_
    assert bool(ctrl.predict(z).all())


def test_bad_input_and_not_fitted(data) -> None:
    z, y = data
    with pytest.raises(NotFittedError):
        CoverageRiskControl().predict(z)
    with pytest.raises(NotFittedError):
        CoverageRiskControl().lambda_hat_  # noqa: B018
    with pytest.raises(ValueError, match="alpha"):
        CoverageRiskControl(alpha=1.5).fit(z, y)
    with pytest.raises(ValueError, match="epsilon"):
        CoverageRiskControl(epsilon=1.0).fit(z, y)
    with pytest.raises(ValueError, match="loss"):
        CoverageRiskControl(loss="dice").fit(z, y)
    with pytest.raises(ValueError, match="score"):
        CoverageRiskControl(score="raps").fit(z, y)
    with pytest.raises(ValueError, match="n_grid"):
        CoverageRiskControl(n_grid=1).fit(z, y)
    with pytest.raises(ValueError, match="class_index"):
        FNRControl(class_index=9).fit(z, y)
    with pytest.raises(ValueError, match="target"):
        CoverageRiskControl().fit(z)
    with pytest.raises(ValueError, match="shape"):
        CoverageRiskControl().fit(z, y[:, :4])
    with pytest.raises(ValueError, match="outside"):
        CoverageRiskControl().fit(z, torch.full_like(y, 9))
    bad = z.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CoverageRiskControl().fit(bad, y)
    with pytest.raises(TypeError, match="data"):
        CoverageRiskControl().fit("logits")
    with pytest.raises(ValueError, match="empty"):
        CoverageRiskControl().fit([])
    ctrl = CoverageRiskControl(alpha=0.2).fit(z, y)
    with pytest.raises(ValueError, match="C=3"):
        ctrl.predict(z[:, :3])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ctrl.predict(z[0])


def test_params_and_repr() -> None:
    ctrl = FNRControl(alpha=0.05, class_index=3, ignore_index=None)
    assert ctrl.get_params()["class_index"] == 3
    assert "FNRControl(alpha=0.05" in repr(ctrl)
    assert ctrl.set_params(alpha=0.2).alpha == 0.2
    with pytest.raises(ValueError, match="invalid parameter"):
        ctrl.set_params(beta=1)
    assert type(ctrl)(**ctrl.get_params()).get_params() == ctrl.get_params()  # sklearn-style clone


def test_clopper_pearson_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 200), (1, 1)]:
        lo, hi = clopper_pearson(k, n, 0.95)
        ref_lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
        ref_hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
        assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)
    with pytest.raises(ValueError):
        clopper_pearson(5, 3)


def test_evaluate_reports_risk_intervals_classes_and_subsets(data) -> None:
    z, y = data
    res = evaluate(CoverageRiskControl(alpha=0.1), (z[:50], y[:50]), {"test": (z[50:], y[50:])},
                   subsets={"first": [str(i) for i in range(10)], "absent": ["nope"]}, alphas=(0.05, 0.1, 0.2))
    json.dumps(res)  # plain JSON
    t = res["splits"]["test"]
    ref = CoverageRiskControl(alpha=0.1).fit(z[:50], y[:50])
    losses = ref.per_image_curves(z[50:], y[50:], grid=torch.tensor([ref.threshold_], dtype=torch.float64))
    assert res["threshold"] == ref.threshold_
    assert t["n_images"] == 30 and t["risk"] == pytest.approx(float(losses["losses"].mean()))
    k = round(t["risk"] * 30)
    assert t["risk_ci"] == pytest.approx(list(clopper_pearson(k, 30)))
    assert t["interval"] == "clopper-pearson" and t["coverage"] == pytest.approx(1 - t["risk"])
    sets = ref.predict(z[50:])
    valid = y[50:] != 255
    assert t["mean_set_size"] == pytest.approx(float(sets.sum(1)[valid].double().mean()))
    hit = sets.gather(1, torch.where(valid, y[50:], 0)[:, None])[:, 0] & valid
    assert t["pixel_coverage"] == pytest.approx(float(hit.sum()) / float(valid.sum()))
    c1 = t["per_class"]["class_1"]
    assert c1["pixels"] == int((y[50:] == 1).sum())
    assert c1["coverage"] == pytest.approx(float(sets[:, 1][y[50:] == 1].double().mean()))
    assert set(t["subsets"]) == {"first"} and t["subsets"]["first"]["n_images"] == 10
    assert [s["alpha"] for s in t["sweep"]] == [0.05, 0.1, 0.2]
    assert t["sweep"][1]["threshold"] >= ref.threshold_ - 1e-12  # coarse grid: never below the refined λ̂
    assert len(t["examples"]) == 2 and len(t["examples"][0]["set_size"]) == 8
    fnr = evaluate(FNRControl(alpha=0.1, class_index=1), (z[:50], y[:50]), {"test": (z[50:], y[50:])})
    ft = fnr["splits"]["test"]
    assert ft["interval"] == "normal" and math.isfinite(ft["risk_ci"][0])
    mask = FNRControl(alpha=0.1, class_index=1).fit(z[:50], y[:50]).predict(z[50:])
    pos = y[50:] == 1
    assert ft["pixel_coverage"] == pytest.approx(float((mask & pos).sum()) / float(pos.sum()))
    with pytest.raises(TypeError, match="controller"):
        evaluate(object(), None, {})


def test_image_curves_one_pass_equals_separate_passes(data) -> None:
    z, y = data
    ctrls = [CoverageRiskControl(alpha=0.1, n_grid=101), CoverageRiskControl(loss="fraction", n_grid=101),
             CoverageRiskControl(score="aps", n_grid=101), FNRControl(class_index=2, n_grid=101)]
    together = image_curves(ctrls, z, y)
    for ctrl, cur in zip(ctrls, together, strict=True):
        alone = ctrl.per_image_curves(z, y)
        for key in ("losses", "set_sizes", "valid_pixels", "counted", "grid"):
            assert torch.equal(cur[key], alone[key]), key
        assert cur["names"] == alone["names"] == [str(i) for i in range(80)]
    # set sizes are exact counts: for LAC at λ, the number of (valid pixel, class) pairs with p >= 1 - λ
    p = torch.softmax(z.double(), 1)
    lam = float(together[0]["grid"][37])
    ref = ((p >= 1 - lam) & (y != 255)[:, None]).flatten(1).sum(1)
    assert torch.equal(together[0]["set_sizes"][:, 37], ref)


def test_threshold_for_other_alpha_equals_a_coarse_fit(data) -> None:
    z, y = data
    ctrl = CoverageRiskControl(alpha=0.1, n_grid=201).fit(z, y)
    for a in (0.05, 0.2, 0.3):
        assert ctrl.threshold_for(a) == CoverageRiskControl(alpha=a, n_grid=201, refine=False).fit(z, y).threshold_
    with pytest.raises(ValueError, match="alpha"):
        ctrl.threshold_for(0.0)


def test_save_load_round_trip_and_registry(data, tmp_path) -> None:
    from segcal.conformal import get_controller, load

    z, y = data
    ts = TemperatureScaling().fit(*make_data(20, seed=9))
    for ctrl in (CoverageRiskControl(alpha=0.2, calibrator=ts, n_grid=101),
                 FNRControl(alpha=0.2, class_index=1, count_empty=False, n_grid=101)):
        ctrl.fit(z, y)
        ctrl.save(tmp_path / "c.pt")
        back = load(str(tmp_path / "c.pt"))
        assert type(back) is type(ctrl) and back.threshold_ == ctrl.threshold_
        assert back.risk_bound_ == ctrl.risk_bound_ and torch.equal(back.predict(z), ctrl.predict(z))
        assert back.threshold_for(0.3) == ctrl.threshold_for(0.3)
    with pytest.raises(ValueError, match="not a FNRControl"):
        CoverageRiskControl(n_grid=101).fit(z, y).save(tmp_path / "d.pt") or FNRControl.load(tmp_path / "d.pt")
    with pytest.raises(TypeError, match="callable"):
        RiskControl(_miss_fraction, n_grid=11, alpha=0.3).fit(z, y).save(tmp_path / "e.pt")
    assert isinstance(get_controller("fnr", class_index=2), FNRControl)
    assert isinstance(get_controller("CoverageRiskControl", epsilon=0.2), CoverageRiskControl)
    with pytest.raises(ValueError, match="unknown risk controller"):
        get_controller("raps")
