"""The benchmark pipeline end to end on synthetic data: every section filled, report written, runs identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segcal.engine import benchmark
from segcal.engine.benchmark import BenchmarkConfig, run_benchmark
from segcal.models import build_espnet


@pytest.fixture
def tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_model(cfg: BenchmarkConfig, name: str):
        torch.manual_seed(0)
        return build_espnet("camvid", num_classes=11, name=name).eval()

    monkeypatch.setattr(benchmark, "load_model", load_model)


def _config(out: Path, cache: Path) -> BenchmarkConfig:
    return BenchmarkConfig(out=out, cache=cache, model="toy", dataset="synthetic", shift_model=None,
                           calibrators=("ts", "histogram"), detectors=("msp", "energy", "sml"),
                           corruptions=("gaussian_noise",), severities=(2,), n_images=6, n_shift_images=3,
                           n_examples=1, anomalies=True, progress=False,
                           method_kwargs={})


def test_benchmark_writes_every_section_and_is_deterministic(tmp_path, tiny_model):
    pytest.importorskip("skimage")
    first = run_benchmark(_config(tmp_path / "a", tmp_path / "cache"))
    assert set(first["calibration"]["test (all)"]) == {"uncalibrated", "ts", "histogram"}
    idm = first["detection"]["IDM: CamVid test (positive = mispredicted pixel)"]
    assert set(idm) == {"msp", "energy", "sml"}
    assert all(0.0 <= r["auroc"] <= 1.0 for r in idm.values())
    ood = first["detection"]["OOD: pasted anomalies on CamVid test"]
    assert all(0.0 <= r["open_set_miou"] <= 1.0 for r in ood.values())
    assert set(first["shift"]["gaussian_noise"]) == {"0", "2"}
    assert (tmp_path / "a" / "index.html").stat().st_size > 10_000
    assert "SYNTHETIC" in (tmp_path / "a" / "results.md").read_text()
    # TS never changes the prediction (an untrained net has float32 near-ties that softmax(z/T) may round apart)
    test = first["calibration"]["test (all)"]
    assert abs(test["ts"]["accuracy"] - test["uncalibrated"]["accuracy"]) < 1e-3  # float32 near-ties only
    run_benchmark(_config(tmp_path / "b", tmp_path / "cache"))
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    for side in (a, b):
        for ex in side["examples"]:
            ex["panels"] = sorted(ex["panels"])  # same files, different folders
    assert a == b
