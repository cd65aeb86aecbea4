"""Common check suite: every registered detector honours the method contract (segcal._estimator)."""

from __future__ import annotations

import pickle

import pytest
import torch

import segcal.calibrators
import segcal.detectors
from segcal import _estimator
from segcal.calibrators import SelectiveScaling
from segcal.detectors import DETECTORS, Detector, NotFittedError, check_is_fitted, clone, get_detector, load

from ._synthetic import as_batches, synthetic

# Small, fast settings (FlowEneDet: one tiny epoch); the ones not listed use their defaults.
FAST = {
    "flowenedet-u": {"epochs": 1, "warmup_steps": 1, "n_blocks": 2},
    "flowenedet-c": {"epochs": 1, "warmup_steps": 1, "n_blocks": 2},
    "selective": {"calibrator": SelectiveScaling(epochs=2, max_pixels=1500, batch_size=256)},
}
SHIPPED = sorted(n for n, cls in DETECTORS.items() if cls.__module__.startswith("segcal."))
LEARNED = [n for n in SHIPPED if DETECTORS[n].requires_fit]


def make(name: str, **kw: object) -> Detector:
    return get_detector(name, **{**FAST.get(name, {}), **kw})


@pytest.fixture(scope="module")
def data():
    z, y, f = synthetic(4, 0, hw=16)
    return as_batches(z, y, f, bs=2), (z, y, f)


def fitted(name: str, data) -> Detector:
    batches, _ = data
    torch.manual_seed(0)
    return make(name).fit(batches)


def score(det: Detector, data) -> torch.Tensor:
    _, (z, _, f) = data
    return det.score(z, features=f if det.needs_features else None)


def same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        elif isinstance(a[k], _estimator.Estimator):
            assert type(a[k]) is type(b[k])
            same_params(a[k].get_params(), b[k].get_params())
        else:
            assert a[k] == b[k], k


def test_registry_lists_every_shipped_detector():
    assert set(SHIPPED) == {"msp", "max_logit", "entropy", "energy", "sml", "flowenedet-u", "flowenedet-c",
                            "selective"}
    assert set(LEARNED) == {"sml", "flowenedet-u", "flowenedet-c", "selective"}
    assert [n for n in SHIPPED if DETECTORS[n].needs_features] == ["flowenedet-c"]


@pytest.mark.parametrize("name", SHIPPED)
def test_fit_returns_self_and_scores_every_pixel(name, data):
    batches, (z, y, f) = data
    det = make(name)
    assert det.fit(batches) is det
    check_is_fitted(det)
    s = score(det, data)
    assert s.shape == y.shape and s.is_floating_point() and torch.isfinite(s).all()
    # the uniform signature: images are accepted (and ignored by detectors that do not need them)
    feats = f if det.needs_features else None
    torch.testing.assert_close(det.score(z, features=feats, images=torch.rand(4, 3, 16, 16)), s)


@pytest.mark.parametrize("name", SHIPPED)
def test_get_params_round_trip(name):
    det = make(name)
    params = det.get_params()
    same_params(type(det)(**params).get_params(), params)
    assert repr(det).startswith(type(det).__name__ + "(")
    if det.requires_fit:
        assert params["ignore_index"] == 255  # learned detectors take the store's void label
        assert det.set_params(ignore_index=7).ignore_index == 7
    with pytest.raises(ValueError, match="invalid parameter"):
        det.set_params(bogus=1)


@pytest.mark.parametrize("name", LEARNED)
def test_unfitted_and_clone_raise_not_fitted(name, data):
    _, (z, _, f) = data
    with pytest.raises(NotFittedError, match=r"not fitted|no calibrator"):
        make(name).score(z, f)
    det = fitted(name, data)
    copy = clone(det)
    assert type(copy) is type(det) and not copy.is_fitted()
    same_params(copy.get_params(), det.get_params())
    with pytest.raises(NotFittedError):
        copy.score(z, f)


def test_clone_deep_copies_estimator_parameters(data):
    det = fitted("selective", data)
    copy = clone(det)
    assert copy.calibrator is not det.calibrator and not copy.calibrator.is_fitted()


@pytest.mark.parametrize("name", SHIPPED)
def test_save_load_round_trip_gives_identical_scores(name, data, tmp_path):
    det = fitted(name, data)
    path = tmp_path / f"{name}.pt"
    det.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "segcal.estimator" and raw["kind"] == "detector" and raw["name"] == name
    ref = score(det, data)
    for loaded in (load(path), Detector.load(path), type(det).load(path)):
        assert type(loaded) is type(det)
        same_params(loaded.get_params(), det.get_params())
        torch.testing.assert_close(score(loaded, data), ref, atol=0, rtol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_unfitted_save_keeps_parameters_only(tmp_path):
    path = tmp_path / "fed.pt"
    make("flowenedet-c", n_blocks=3).save(path)
    loaded = load(path)
    assert type(loaded).name == "flowenedet-c" and loaded.n_blocks == 3 and not loaded.is_fitted()


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "pickle", "wrong-dict", "bad-state", "other-kind"])
def test_corrupted_file_gives_one_line_value_error_naming_the_path(corruption, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "det.pt"
    fitted("sml", data).save(path)
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif corruption == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif corruption == "pickle":
        path.write_bytes(pickle.dumps({"format": "segcal.estimator", "x": _Boom()}))
    elif corruption == "wrong-dict":
        torch.save({"format": "segcal.estimator", "version": 1, "kind": "detector", "name": "no-such"}, path)
    elif corruption == "bad-state":
        d = torch.load(path, weights_only=True)
        d["state"]["class_std_"] = -d["state"]["class_std_"]
        torch.save(d, path)
    else:
        segcal.calibrators.TemperatureScaling().fit(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4).long()).save(path)
    with pytest.raises(ValueError, match=r"det\.pt") as err:
        load(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_name_normalisation_and_unknown_names():
    assert type(get_detector("Max_Logit")) is DETECTORS["max-logit"] is DETECTORS["MaxLogit"]
    assert type(get_detector("FLOWENEDET_C")).needs_features
    assert "max-logit" in DETECTORS and "nope" not in DETECTORS
    with pytest.raises(ValueError, match=r"unknown detector 'nope'.*msp"):
        get_detector("nope")


def test_one_not_fitted_error_everywhere():
    assert segcal.detectors.NotFittedError is segcal.calibrators.NotFittedError is _estimator.NotFittedError
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)


def test_pretrained_is_asked_of_every_class():
    for name in SHIPPED:
        assert DETECTORS[name].pretrained("no-such-model") is None
        assert DETECTORS[name].pretrained("../../etc/passwd") is None
    for name in ("sml", "flowenedet-u", "flowenedet-c"):
        det = DETECTORS[name].pretrained("espnet-camvid")
        assert type(det) is DETECTORS[name] and det.is_fitted()
    assert DETECTORS["msp"].pretrained("espnet-camvid") is None


def test_flowenedet_variant_is_a_class_level_declaration():
    from segcal.detectors import FlowEneDet, FlowEneDetC, FlowEneDetU

    assert type(FlowEneDet(variant="c")) is FlowEneDetC and FlowEneDetC.needs_features
    assert type(FlowEneDet()) is FlowEneDetU and not FlowEneDetU.needs_features
    with pytest.raises(ValueError, match="variant"):
        FlowEneDetC(variant="u")


def test_flowenedet_fits_its_own_sml_statistics_from_the_batches(data):
    from segcal.detectors import fit_sml_statistics

    batches, _ = data
    det = fitted("flowenedet-u", data)
    torch.testing.assert_close(det.sml_.class_mean_, fit_sml_statistics(batches).class_mean_)


# ------------------------------------------------------------------------------ a detector defined in a test file
class DummyDetector(Detector):
    """Score = − max logit + a learned offset (the mean max logit of the fit data)."""

    name = "dummy"
    _learned = ("offset_",)

    def __init__(self, scale: float = 1.0, *, ignore_index: int | None = 255) -> None:
        self.scale = scale
        self.ignore_index = ignore_index

    def fit(self, batches):
        tops = [b["logits"].amax(1).mean() for b in batches]
        self.offset_ = float(torch.stack(tops).mean())
        return self

    def score(self, logits, features=None, images=None):
        check_is_fitted(self)
        return self.scale * (self.offset_ - logits.amax(1))


def test_a_detector_defined_in_a_test_file_is_registered(data, tmp_path):
    batches, (z, _, _) = data
    det = get_detector("Dummy", scale=2.0)
    assert type(det) is DummyDetector and "dummy" in DETECTORS
    with pytest.raises(NotFittedError):
        det.score(z)
    det.fit(batches)
    det.save(tmp_path / "d.pt")
    torch.testing.assert_close(load(tmp_path / "d.pt").score(z), det.score(z), atol=0, rtol=0)
    assert DummyDetector.pretrained("espnet-camvid") is None
