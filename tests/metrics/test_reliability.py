import numpy as np
import pytest
import torch

from segcal.metrics import CalibrationMetrics, ReliabilityDiagram


def test_reliability_data_and_plot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    m = CalibrationMetrics(4, n_bins=10, boundary_width=1)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 4, (2, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    m.update(torch.randn(2, 4, 16, 16, generator=g) * 3, blocks)
    rel = m.reliability()
    assert rel["edges"].shape == (11,) and rel["count"].shape == (10,)
    assert float(rel["count"].sum()) == 512
    d = ReliabilityDiagram.from_metric(m)
    assert d.ece == pytest.approx(float(m.compute()["ece"]), abs=1e-12)
    ax = d.plot()
    assert ax.get_xlabel() == "confidence"
    db = ReliabilityDiagram.from_metric(m, region="boundary")
    assert 0 < np.nansum(db.count) < 512
    matplotlib.pyplot.close("all")
