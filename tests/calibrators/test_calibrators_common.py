"""Common check suite: every calibrator passes the same behavioural checks."""

from __future__ import annotations

import pickle

import pytest
import torch

from segcal.calibrators import (
    CALIBRATORS,
    Calibrator,
    IsotonicCalibration,
    NotFittedError,
    SelectiveScaling,
    TemperatureScaling,
    check_is_fitted,
    clone,
    get_calibrator,
    load,
)

# Small, fast settings; the ones not listed use their defaults.
FAST = {
    "lts": {"epochs": 2, "lr": 1e-2},
    "selective": {"epochs": 3, "max_pixels": 3000, "batch_size": 512},
    "vs": {"max_iter": 10},
    "ms": {"max_iter": 10},
    "dirichlet": {"max_iter": 10, "reg_lambda": 1e-3},
    "ets": {"max_iter": 10},
}
NAMES = sorted(n for n, cls in CALIBRATORS.items() if cls.__module__.startswith("segcal."))
# Documented exceptions: VS/MS/Dirichlet reorder classes; binning calibrators keep the argmax in top-label mode.
PRESERVE = {"ts", "ets", "lts", "selective", "histogram", "isotonic"}


def make(name: str, **kw: object) -> Calibrator:
    return get_calibrator(name, **{**FAST.get(name, {}), **kw})


def data(seed: int = 0, n: int = 4, c: int = 4, h: int = 12, w: int = 12, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, h, w, generator=g) * 3
    p = torch.softmax(z / 2.0, 1).permute(0, 2, 3, 1).reshape(-1, c)
    y = torch.multinomial(p, 1, generator=g).view(n, h, w)
    y[:, 0, :] = 255
    img = torch.rand(n, 3, h, w, generator=g)
    return z.to(dtype), y, img


def fit(cal: Calibrator, z: torch.Tensor, y: torch.Tensor, img: torch.Tensor) -> Calibrator:
    return cal.fit(z, y, images=img if cal.needs_images else None)


def state_tensors(cal: Calibrator) -> dict[str, object]:
    out = {}
    for k, v in cal._get_state().items():
        if k in ("history_",):
            continue
        out[k] = v
    return out


def assert_same_state(a: Calibrator, b: Calibrator, atol: float = 0.0) -> None:
    sa, sb = state_tensors(a), state_tensors(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        va, vb = sa[k], sb[k]
        if isinstance(va, dict) and "__calibrator__" not in va:
            for kk in va:
                torch.testing.assert_close(va[kk], vb[kk], atol=atol, rtol=0, msg=f"{k}.{kk}")
        elif isinstance(va, torch.Tensor):
            torch.testing.assert_close(va, vb, atol=atol, rtol=0, msg=k)
        elif isinstance(va, float):
            assert va == pytest.approx(vb, abs=atol, rel=0), k
        elif isinstance(va, Calibrator):
            assert type(va) is type(vb), k
            assert_same_state(va, vb, atol)
        elif not isinstance(va, dict):
            assert va == vb, k


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtype_and_probabilities(name: str) -> None:
    z, y, img = data()
    cal = fit(make(name), z, y, img)
    out = cal.transform(z, img)
    assert out.shape == z.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    p = cal.predict_proba(z, img)
    torch.testing.assert_close(p.sum(1), torch.ones(4, 12, 12))
    assert cal.num_classes_ == 4


@pytest.mark.parametrize("name", NAMES)
def test_argmax_preserved_where_promised(name: str) -> None:
    z, y, img = data(1)
    cal = fit(make(name), z, y, img)
    assert cal.preserves_argmax == (name in PRESERVE)
    if cal.preserves_argmax:
        assert torch.equal(cal.transform(z, img).argmax(1), z.argmax(1))


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"lts"}))
def test_ignore_pixels_have_no_influence(name: str) -> None:
    # LTS is the documented exception: ignore-pixel logits are spatial context (as at test time).
    z, y, img = data(2)
    z2 = z.clone()
    ign = (y == 255)[:, None].expand_as(z)
    z2[ign] = torch.randn(int(ign.sum())) * 50
    a, b = fit(make(name), z, y, img), fit(make(name), z2, y, img)
    assert_same_state(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_refit_is_idempotent(name: str) -> None:
    z, y, img = data(3)
    z_other, y_other, _ = data(4)
    cal = fit(make(name), z, y, img)
    first = make(name)
    fit(first, z, y, img)
    fit(cal, z_other, y_other, img)
    fit(cal, z, y, img)  # refit overwrites everything learned before
    assert_same_state(cal, first)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    z, y, img = data(5)
    cal = fit(make(name), z, y, img)
    path = tmp_path / f"{name}.pt"
    cal.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["class"] == type(cal).__name__
    for loaded in (load(path), type(cal).load(path)):
        assert type(loaded) is type(cal)
        assert loaded.get_params().keys() == cal.get_params().keys()
        torch.testing.assert_close(loaded.transform(z, img), cal.transform(z, img), atol=0, rtol=0)


def test_load_wrong_class_raises(tmp_path) -> None:
    z, y, _ = data()
    path = tmp_path / "ts.pt"
    make("ts").fit(z, y).save(path)
    with pytest.raises(ValueError, match="not a VectorScaling"):
        CALIBRATORS["vs"].load(path)


@pytest.mark.parametrize("name", NAMES)
def test_unfitted_raises_clear_error(name: str) -> None:
    z, _, img = data()
    with pytest.raises(NotFittedError, match="not fitted"):
        make(name).transform(z, img)


@pytest.mark.parametrize("name", NAMES)
def test_input_validation(name: str) -> None:
    z, y, img = data()
    cal = make(name)
    with pytest.raises(ValueError, match="target"):
        cal.fit(z, y[:, :-1], images=img)
    bad = y.clone()
    bad[0, 3, 3] = 7
    with pytest.raises(ValueError, match="labels outside"):
        cal.fit(z, bad, images=img)
    nan = z.clone()
    nan[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cal.fit(nan, y, images=img)
    fit(cal, z, y, img)
    with pytest.raises(ValueError, match="C=5"):
        cal.transform(torch.randn(1, 5, 12, 12), img[:1])
    with pytest.raises(ValueError, match="no valid pixels"):
        make(name).fit(z, torch.full_like(y, 255), images=img)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["one_class", "all_correct", "tiny", "float16"])
def test_degenerate_inputs_survive(name: str, case: str) -> None:
    z, y, img = data(6)
    if case == "one_class":
        y = torch.where(y == 255, y, torch.zeros_like(y))
    elif case == "all_correct":
        z = z * 20
        y = z.argmax(1)
    elif case == "tiny":
        z, y, img = z[:1, :, :2, :2].contiguous(), y[:1, 1:3, :2].contiguous(), img[:1, :, :2, :2].contiguous()
        z = torch.randn(1, 4, 2, 2)
    elif case == "float16":
        z = z.half()
    cal = fit(make(name), z, y, img)
    out = cal.transform(z, img)
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert torch.isfinite(cal.predict_proba(z, img)).all()
    if cal.preserves_argmax:
        assert torch.equal(out.argmax(1), z.float().argmax(1))


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"lts"}))
def test_batches_equal_tensor_fit(name: str) -> None:
    # LTS takes one Adam step per batch, so its result depends on the batching by design.
    z, y, img = data(7)
    ref = fit(make(name), z, y, img)
    batches = [{"logits": z[i:i + 2], "target": y[i:i + 2], "images": img[i:i + 2], "names": ["a", "b"]}
               for i in (0, 2)]
    for source in (batches, lambda: iter(batches)):
        cal = make(name).fit(source)
        assert_same_state(cal, ref, atol=1e-4)


def test_one_shot_iterator_rules() -> None:
    z, y, _ = data(8)
    gen = ((z[i:i + 2], y[i:i + 2]) for i in (0, 2))
    make("histogram").fit(gen)  # single pass: fine
    gen = ((z[i:i + 2], y[i:i + 2]) for i in (0, 2))
    with pytest.raises(ValueError, match="one-shot iterator"):
        make("ts").fit(gen)


def test_registry() -> None:
    assert set(NAMES) == {"ts", "vs", "ms", "dirichlet", "ets", "lts", "selective", "histogram", "isotonic"}
    assert type(get_calibrator("TemperatureScaling")) is CALIBRATORS["ts"]
    for alias in ("TS", " ts ", "temperaturescaling", "Temperature_Scaling".replace("_", "")):
        assert type(get_calibrator(alias)) is TemperatureScaling
    assert CALIBRATORS["LTS"].needs_images and not any(CALIBRATORS[n].needs_images for n in set(NAMES) - {"lts"})
    assert not any(CALIBRATORS[n].needs_features for n in NAMES) and all(CALIBRATORS[n].requires_fit for n in NAMES)
    with pytest.raises(ValueError, match=r"unknown calibrator 'nope'; choose one of .*'ts'"):
        get_calibrator("nope")
    assert get_calibrator("ts", t_bounds=(0.5, 2.0)).t_bounds == (0.5, 2.0)
    with pytest.raises(ValueError, match="unknown calibrator"):
        get_calibrator("nope")
    with pytest.raises(ValueError, match="invalid parameter"):
        get_calibrator("ts").set_params(bogus=1)


@pytest.mark.parametrize("name", ["ts", "histogram", "selective"])
def test_fit_from_logits_store(name: str, tmp_path) -> None:
    from segcal.data import LogitsStore

    z, y, _ = data(9)
    store = LogitsStore.create(tmp_path / "store", {"model": "m", "dataset": "toy", "split": "val",
                                                    "num_classes": 4})
    for i in range(4):
        store.write(f"img{i}", z[i], y[i])
    store.finalize()
    store = LogitsStore(tmp_path / "store")
    ref = make(name).fit(z.half().float(), y)  # the store keeps float16 logits
    for source in (store, lambda: store.batches(batch_size=3)):
        assert_same_state(make(name).fit(source), ref, atol=1e-4)


# ------------------------------------------------------------------------------------------ the method contract
def same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], Calibrator):
            assert type(a[k]) is type(b[k])
            same_params(a[k].get_params(), b[k].get_params())
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("name", NAMES)
def test_get_params_round_trip_and_ignore_index(name: str) -> None:
    cal = make(name, ignore_index=7)
    params = cal.get_params()
    assert params["ignore_index"] == 7  # every calibrator takes the data's void label
    same_params(type(cal)(**params).get_params(), params)
    assert cal.set_params(ignore_index=None).ignore_index is None


@pytest.mark.parametrize("name", NAMES)
def test_clone_is_unfitted_with_the_same_parameters(name: str) -> None:
    z, y, img = data(10)
    cal = fit(make(name), z, y, img)
    check_is_fitted(cal)
    copy = clone(cal)
    assert type(copy) is type(cal) and not copy.is_fitted()
    same_params(copy.get_params(), cal.get_params())
    with pytest.raises(NotFittedError, match="not fitted"):
        copy.transform(z, img)
    with pytest.raises(NotFittedError):
        check_is_fitted(copy)


def test_clone_and_set_params_reach_nested_estimators() -> None:
    sel = SelectiveScaling(base=TemperatureScaling(t_bounds=(0.5, 2.0)), epochs=1)
    copy = clone(sel)
    assert copy.base is not sel.base and copy.base.t_bounds == (0.5, 2.0)
    assert sel.get_params(deep=True)["base__t_bounds"] == (0.5, 2.0)
    sel.set_params(base__t_bounds=(0.1, 3.0))
    assert sel.base.t_bounds == (0.1, 3.0)


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "pickle", "no-format", "bad-state", "bad-params"])
def test_corrupted_file_gives_one_line_value_error_naming_the_path(corruption: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    z, y, _ = data()
    path = tmp_path / "cal.pt"
    make("vs").fit(z, y).save(path)
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif corruption == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif corruption == "pickle":
        path.write_bytes(pickle.dumps(_Boom()))
    elif corruption == "no-format":
        torch.save({"weights": torch.ones(3)}, path)
    elif corruption == "bad-state":
        d = torch.load(path, weights_only=True)
        del d["state"]["weight_"]
        torch.save(d, path)
    else:
        d = torch.load(path, weights_only=True)
        d["params"]["no_such_param"] = 1
        torch.save(d, path)
    with pytest.raises(ValueError, match=r"cal\.pt") as err:
        load(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_save_is_atomic_and_unfitted_save_keeps_parameters(tmp_path) -> None:
    path = tmp_path / "ts.pt"
    make("ts", t_bounds=(0.3, 3.0)).save(path)
    loaded = load(path)
    assert loaded.t_bounds == (0.3, 3.0) and not loaded.is_fitted()
    assert [p.name for p in tmp_path.iterdir()] == ["ts.pt"]


def test_first_format_files_still_load(tmp_path) -> None:
    z, y, _ = data()
    ts = make("ts").fit(z, y)
    legacy = {"format": "segcal.calibrator", "version": 1, "class": "SelectiveScaling",
              "params": {**{k: v for k, v in SelectiveScaling().get_params().items() if k != "base"},
                         "base": {"__calibrator__": {"format": "segcal.calibrator", "version": 1,
                                                     "class": "TemperatureScaling", "params": ts.get_params()}}},
              "state": None}
    torch.save(legacy, tmp_path / "old.pt")
    old = load(tmp_path / "old.pt")
    assert type(old) is SelectiveScaling and type(old.base) is TemperatureScaling


# --------------------------------------------------------------------------- a calibrator defined in a test file
class DummyCalibrator(Calibrator):
    """Divides the logits by (1 + the mean absolute logit of the fit data): enough to tell fitted from unfitted."""

    name = "dummy"
    _learned = ("scale_",)

    def __init__(self, ignore_index: int | None = 255, *, shift: float = 1.0) -> None:
        self.ignore_index = ignore_index
        self.shift = shift

    def _fit(self, source) -> None:
        total = [b.logits.abs().mean() for b in source]
        self.scale_ = self.shift + float(torch.stack(total).mean())

    def _transform(self, z, images):
        return z / self.scale_


def test_a_calibrator_defined_in_a_test_file_is_registered(tmp_path) -> None:
    z, y, _ = data(11)
    cal = get_calibrator("DUMMY", shift=2.0)
    assert type(cal) is DummyCalibrator and "dummy" in CALIBRATORS
    cal.fit(z, y)
    cal.save(tmp_path / "d.pt")
    torch.testing.assert_close(load(tmp_path / "d.pt").transform(z), z / cal.scale_)


def test_dummy_calibrator_reaches_segcal_fit(tmp_path) -> None:
    from segcal.cli import main
    from segcal.data import LogitsStore

    z, y, _ = data(12)
    store = LogitsStore.create(tmp_path / "store", {"model": "m", "dataset": "toy", "split": "val",
                                                    "num_classes": 4})
    for i in range(4):
        store.write(f"img{i}", z[i], y[i])
    store.finalize()
    assert main(["fit", "--logits", str(tmp_path / "store"), "--calibrator", "dummy", "--arg", "shift=3",
                 "--out", str(tmp_path / "dummy.pt")]) == 0
    cal = load(tmp_path / "dummy.pt")
    assert type(cal) is DummyCalibrator and cal.shift == 3 and cal.is_fitted()


@pytest.mark.parametrize("base", [None, TemperatureScaling(), IsotonicCalibration(), "isotonic"])
def test_selective_composes_any_calibrator_through_public_api(base) -> None:
    z, y, _ = data(13, n=8)
    sel = make("selective", base=base).fit(z, y)
    out = sel.transform(z)
    assert torch.equal(out.argmax(1), z.argmax(1)) and torch.isfinite(out).all()
    if base is None:  # the paper's form: unflagged pixels untouched
        kept = (sel.misprediction_proba(z) <= sel.threshold)[:, None].expand_as(z)
        torch.testing.assert_close(out[kept], z[kept])
    elif isinstance(base, str):
        assert type(sel.base_) is IsotonicCalibration and sel.base == "isotonic"
    else:
        assert type(sel.base_) is type(base) and sel.base_ is not base and not base.is_fitted()


def test_selective_default_base_is_temperature_scaling() -> None:
    # measured on ESPNet-CamVid (docs/calibrators.md): base=TS 0.82x TS's test ECE, the paper's identity 1.7x
    assert SelectiveScaling().base == "ts"
    z, y, _ = data(16, n=8)
    assert type(make("selective").fit(z, y).base_) is TemperatureScaling


class SpyTemperatureScaling(TemperatureScaling):
    """Temperature scaling that records the logits it was fitted on."""

    name = "spy-ts"

    def _fit(self, source) -> None:
        self.seen_ = [b.logits.clone() for b in source]
        super()._fit(source)


@pytest.mark.parametrize("base_data", ["held_out", "all"])
def test_selective_fits_its_base_on_images_the_detector_never_trained_on(base_data: str) -> None:
    from segcal.calibrators._base import BatchSource, subsample_pixels

    z, y, _ = data(14, n=12)
    kw = dict(epochs=3, max_pixels=3000, batch_size=512, seed=3)
    sel = SelectiveScaling(base=SpyTemperatureScaling(), base_data=base_data, **kw).fit(z, y)
    seen = torch.cat(sel.base_.seen_)
    seen_idx = [i for i in range(len(z)) if any(torch.equal(z[i], s) for s in seen)]
    assert seen_idx == sel.base_images_ and len(seen) == len(seen_idx)
    # the image split the detector used (same seed, same draws): part 0 = its training images
    parts: list[int] = []
    subsample_pixels(BatchSource(z, y, ignore_index=255), 255, kw["max_pixels"],
                     torch.Generator().manual_seed(kw["seed"]), parts=(0.65, 0.15, 0.2), image_parts=parts)
    if base_data == "held_out":
        assert seen_idx == [i for i, p in enumerate(parts) if p != 0] and 0 < len(seen_idx) < len(z)
    else:
        assert seen_idx == list(range(len(z)))
    with pytest.raises(ValueError, match="base_data"):
        SelectiveScaling(base=TemperatureScaling(), base_data="train").fit(z, y)


def test_selective_base_survives_a_detector_that_flags_every_pixel() -> None:
    z, y, _ = data(14, n=12)
    sel = SelectiveScaling(base=TemperatureScaling(), threshold=1e-9, epochs=1, max_pixels=3000, seed=3).fit(z, y)
    ref = TemperatureScaling().fit(z[sel.base_images_], y[sel.base_images_])  # all valid pixels of those images
    assert 0 < len(sel.base_images_) < len(z)
    assert sel.base_.temperature_ == pytest.approx(ref.temperature_, rel=1e-6)
    torch.testing.assert_close(sel.transform(z), z / sel.temperature_mis_)  # every pixel is flagged


def test_installed_plugins_register_through_entry_points(monkeypatch) -> None:
    from segcal import _estimator

    class FakeEntryPoint:
        def __init__(self, name: str, load) -> None:
            self.name, self.value, self.load = name, f"plugin_pkg:{name}", load

    def load_plugin():  # what importing a plugin module does: define (and thereby register) its class
        class PluginScaling(TemperatureScaling):
            name = "plugin-ts"
        return PluginScaling

    def broken():
        raise ImportError("missing dependency")

    groups = {"segcal.calibrators": [FakeEntryPoint("plugin-ts", load_plugin), FakeEntryPoint("bad", broken)]}
    monkeypatch.setattr(_estimator.metadata, "entry_points", lambda group: groups.get(group, []))
    monkeypatch.setattr(CALIBRATORS, "_classes", dict(CALIBRATORS._classes))  # restored after the test
    monkeypatch.setattr(CALIBRATORS, "_plugins_loaded", False)
    with pytest.warns(UserWarning, match="could not load calibrator plugin 'bad'"):
        cal = get_calibrator("Plugin_TS")
    assert type(cal).__name__ == "PluginScaling" and "plugin-ts" in CALIBRATORS
