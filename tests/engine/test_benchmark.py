"""The protocol end to end on synthetic data: every section filled, report written, runs identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segcal.engine import protocol
from segcal.engine.protocol import BenchmarkConfig, run_benchmark
from segcal.models import build_espnet


@pytest.fixture
def tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_model(cfg: BenchmarkConfig, name: str):
        torch.manual_seed(0)
        return build_espnet("camvid", num_classes=6, name=name).eval()

    monkeypatch.setattr(protocol, "load_model", load_model)


def _config(out: Path, cache: Path) -> BenchmarkConfig:
    return BenchmarkConfig(out=out, cache=cache, model="toy", data="synthetic", shift_models=(),
                           calibrators=("ts", "histogram"), detectors=("msp", "energy", "sml"),
                           corruptions=("gaussian_noise",), severities=(2,), n_images=6, n_shift_images=3,
                           n_examples=1, anomalies=True, progress=False, bootstrap_resamples=50, method_kwargs={})


def test_benchmark_writes_every_section_and_is_deterministic(tmp_path, tiny_model):
    first = run_benchmark(_config(tmp_path / "a", tmp_path / "cache"))
    assert set(first["calibration"]["test"]) == {"uncalibrated", "ts", "histogram"}
    assert set(first["bootstrap"]["test"]) == {"ts vs uncalibrated", "histogram vs uncalibrated"}
    idm = first["detection"]["IDM: test (positive = mispredicted pixel)"]
    assert set(idm) == {"msp", "energy", "sml"}
    assert all(0.0 <= r["auroc"] <= 1.0 for r in idm.values())
    ood = first["detection"]["OOD: pasted anomalies on test"]
    assert all(0.0 <= r["open_set_miou"] <= 1.0 for r in ood.values())
    assert set(first["shift"]["gaussian_noise"]) == {"0", "2"}
    assert first["meta"]["num_classes"] == 6 and len(first["class_names"]) == 6
    assert (tmp_path / "a" / "index.html").stat().st_size > 10_000
    assert "synthetic" in (tmp_path / "a" / "results.md").read_text()
    test = first["calibration"]["test"]
    # an untrained net: TS hits its bound and softmax(z / T) rounds float32 near-ties apart
    assert abs(test["ts"]["accuracy"] - test["uncalibrated"]["accuracy"]) < 5e-3
    run_benchmark(_config(tmp_path / "b", tmp_path / "cache"))
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a == b


def test_results_json_is_written_before_plotting(tmp_path, tiny_model, monkeypatch):
    """A crash while drawing must not lose the numbers."""

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(protocol, "write_examples", broken)
    cfg = _config(tmp_path / "a", tmp_path / "cache")
    cfg.corruptions, cfg.anomalies = (), False
    with pytest.raises(RuntimeError):
        run_benchmark(cfg)
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["calibration"]["test"]["ts"]["ece"] >= 0


def test_missing_optional_stage_is_skipped_with_a_reason(tmp_path, tiny_model, monkeypatch):
    real = protocol._has_module
    monkeypatch.setattr(protocol, "_has_module", lambda name: False if name == "skimage" else real(name))
    cfg = _config(tmp_path / "a", tmp_path / "cache")
    cfg.corruptions = ()
    results = run_benchmark(cfg)
    assert [s["stage"] for s in results["skipped"]] == ["pasted-anomaly OOD protocol"]
    assert not any(k.startswith("OOD") for k in results["detection"])


def test_one_pass_over_several_sets_equals_separate_passes(tmp_path):
    from segcal.calibrators import TemperatureScaling
    from segcal.data import LogitsStore
    from segcal.detectors import MSP

    g = torch.Generator().manual_seed(0)
    store = LogitsStore.create(tmp_path / "s", {"model": "m", "dataset": "d", "split": "test", "num_classes": 4})
    for i in range(7):
        logits, target = torch.randn(4, 6, 5, generator=g) * 3, torch.randint(0, 4, (6, 5), generator=g)
        store.write(f"{'AB'[i % 2]}_{i}", logits, target)
    store.finalize()
    store = LogitsStore(tmp_path / "s")
    cfg = _config(tmp_path / "o", tmp_path / "c")
    cfg.batch_size = 3
    ts = TemperatureScaling().fit(lambda: store.batches(3))
    sets = {"all": None, "A": [n for n in store.names if n[0] == "A"], "B": [n for n in store.names if n[0] == "B"]}
    together, _ = protocol.evaluate_calibrators_on_sets(store, None, {"ts": ts}, cfg, sets)
    idm = protocol.evaluate_idm_on_sets(store, None, {"msp": MSP()}, cfg, sets)
    for key, names in sets.items():
        alone, _ = protocol.evaluate_calibrators_on_sets(store, None, {"ts": ts}, cfg, {key: names})
        _assert_close(together[key], alone[key])
        _assert_close(idm[key], protocol.evaluate_idm_on_sets(store, None, {"msp": MSP()}, cfg, {key: names})[key])


def _assert_close(a, b, tol=1e-6):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y, tol)
    elif isinstance(a, float):
        assert abs(a - b) <= tol, (a, b)
    else:
        assert a == b


def _toy_store(path: Path, n: int = 6) -> object:
    from segcal.data import LogitsStore

    g = torch.Generator().manual_seed(1)
    store = LogitsStore.create(path, {"model": "m", "dataset": "d", "split": "val", "num_classes": 4})
    for i in range(n):  # images get more label noise as i grows, so parts of the store fit different temperatures
        logits = torch.randn(4, 6, 5, generator=g) * 3
        noise = torch.rand(6, 5, generator=g) < 0.1 * i
        store.write(f"im{i}", logits, torch.where(noise, torch.randint(0, 4, (6, 5), generator=g), logits.argmax(0)))
    store.finalize()
    return LogitsStore(path)


def test_fit_on_some_images_of_a_store_equals_fit_on_a_store_of_those_images(tmp_path):
    """fit_calibrators / fit_detectors(images=...) fit on a part of a split (e.g. a fit/select/held-out split)."""
    from segcal.data import LogitsStore

    full = _toy_store(tmp_path / "full")
    part_names = ["im0", "im1", "im3"]
    part = LogitsStore.create(tmp_path / "part", {"model": "m", "dataset": "d", "split": "val", "num_classes": 4})
    for b in full.batches(1, names=part_names):
        part.write(b["names"][0], b["logits"][0], b["target"][0])
    part.finalize()
    part = LogitsStore(tmp_path / "part")
    cfg = _config(tmp_path / "o", tmp_path / "c")
    some, _ = protocol.fit_calibrators(["ts"], full, None, cfg, images=part_names)
    alone, _ = protocol.fit_calibrators(["ts"], part, None, cfg)
    every, _ = protocol.fit_calibrators(["ts"], full, None, cfg)
    assert float(some["ts"].temperature_) == pytest.approx(float(alone["ts"].temperature_), rel=1e-6)
    assert float(some["ts"].temperature_) != pytest.approx(float(every["ts"].temperature_), rel=1e-3)
    from segcal.detectors import DETECTORS

    det = {"sml": protocol.build_method(DETECTORS, "sml", 255)}
    protocol.fit_detectors(det, full, None, cfg, images=part_names)
    ref = {"sml": protocol.build_method(DETECTORS, "sml", 255)}
    protocol.fit_detectors(ref, part, None, cfg)
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(det["sml"].score(x), ref["sml"].score(x))


def test_cached_store_reuses_a_complete_store_with_features(tmp_path):
    from engine_toys import ToyDataset, ToySegmenter

    cfg = _config(tmp_path / "o", tmp_path / "cache")
    model, data = ToySegmenter(), ToyDataset(n=4)
    with_features = protocol.cached_store(model, "toy", data, "val", cfg, features=True)
    calls = model.calls
    plain = protocol.cached_store(model, "toy", data, "val", cfg)
    assert model.calls == calls and plain.path == with_features.path  # nothing predicted again
    other = ToyDataset(n=3)  # different images: predicted into its own store
    assert protocol.cached_store(model, "toy", other, "val", cfg).path != with_features.path
    assert model.calls > calls
