"""The Lightning example runs (2 epochs, CPU) and logs the same numbers as CalibrationMetrics on the same data."""

import importlib.util
import math
from pathlib import Path

import pytest

from segcal.metrics import CalibrationMetrics

pytest.importorskip("lightning")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_segformer_like.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("lightning_segformer_like", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.main(epochs=2, n_train=16, n_val=8, batch_size=4)


def test_logged_values_equal_calibration_metrics(run):
    mod, out = run
    logits, target = mod.predict_logits(out["module"], out["val"])
    ref = CalibrationMetrics(num_classes=4, n_bins=15, ignore_index=255)
    ref.update(logits, target)
    expected = ref.compute()
    logged = out["logged"]
    assert logged["val/ece"] == float(expected["ece"])  # Lightning keeps the float64 value: equal, not close
    for key in ("ece", "mce", "nll", "brier", "oe"):  # val/ece alone, the other four from one MetricCollection
        assert logged[f"val/{key}"] == pytest.approx(float(expected[key]), rel=1e-6, abs=1e-9), key
    assert math.isfinite(logged["train/loss"])


def test_calibrator_fitted_after_training(run):
    _, out = run
    assert 0.02 <= out["temperature"] <= 50.0
    assert 0.0 <= out["ece_after_ts"] <= 1.0
