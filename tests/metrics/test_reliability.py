import numpy as np
import pytest
import torch

import segcal.metrics
import segcal.report
from segcal.metrics import CalibrationMetrics, ExpectedCalibrationError, ReliabilityDisplay

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


def _metric() -> CalibrationMetrics:
    m = CalibrationMetrics(4, n_bins=10, boundary_width=1)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 4, (2, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    m.update(torch.randn(2, 4, 16, 16, generator=g) * 3, blocks)
    return m


def test_reliability_data_and_display_from_metric():
    m = _metric()
    rel = m.reliability()
    assert rel["edges"].shape == (11,) and rel["count"].shape == (10,)
    assert float(rel["count"].sum()) == 512
    d = ReliabilityDisplay.from_metric(m, label="toy")
    assert d.ece == pytest.approx(float(m.compute()["ece"]), abs=1e-12)
    assert d.ax_.get_xlabel() == "confidence" and d.figure_ is d.ax_.figure
    assert "toy" in d.ax_.get_title()
    db = ReliabilityDisplay.from_metric(m, region="boundary")
    assert 0 < np.nansum(db.count) < 512


def test_plot_on_given_ax_returns_self():
    plt = matplotlib.pyplot
    fig, ax = plt.subplots()
    d = ReliabilityDisplay(**{k: v for k, v in _metric().reliability().items()})
    assert d.plot(ax=ax) is d and d.ax_ is ax and d.figure_ is fig


def test_from_predictions_equals_metric_and_scalar_metrics_work():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 3, 8, 8, generator=g) * 2, torch.randint(0, 3, (2, 8, 8), generator=g)
    d = ReliabilityDisplay.from_predictions(logits, target, n_bins=15)
    e = ExpectedCalibrationError(3)
    e.update(logits, target)
    assert d.ece == pytest.approx(float(e.compute()), abs=1e-12)
    assert ReliabilityDisplay.from_metric(e).ece == pytest.approx(d.ece, abs=0)


def test_one_key_for_counts_and_legacy_results_json():
    rel = {k: v.tolist() for k, v in _metric().reliability().items()}
    assert "count" in rel and "counts" not in rel
    d = ReliabilityDisplay.from_reliability(rel)
    legacy = dict(rel)
    legacy["counts"] = legacy.pop("count")
    assert ReliabilityDisplay.from_reliability(legacy).ece == d.ece
    with pytest.raises(ValueError, match="count"):
        ReliabilityDisplay.from_reliability({"edges": rel["edges"]})
    with pytest.raises(ValueError, match="n_bins"):
        ReliabilityDisplay(rel["edges"][:-2], rel["count"], rel["confidence"], rel["accuracy"])


def test_one_class_and_deprecated_alias():
    assert segcal.report.ReliabilityDisplay is ReliabilityDisplay
    with pytest.warns(DeprecationWarning, match="ReliabilityDisplay"):
        alias = segcal.metrics.ReliabilityDiagram
    assert alias is ReliabilityDisplay


def test_from_metric_on_device(device):
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)
    m = ExpectedCalibrationError(3).to(device)
    m.update(logits.to(device), target.to(device))
    d = ReliabilityDisplay.from_metric(m)
    assert d.ece == pytest.approx(float(m.compute()), abs=1e-12)
