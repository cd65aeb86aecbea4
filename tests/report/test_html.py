import json

import numpy as np
import pytest

from segcal.report import metrics_table, render_report


def _reliability(n_bins: int = 10) -> dict:
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.arange(n_bins, dtype=float)
    conf = (edges[:-1] + edges[1:]) / 2
    acc = conf * 0.9
    conf[0] = acc[0] = float("nan")  # empty bin
    return {"edges": edges.tolist(), "counts": counts.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist()}


def test_metrics_table_highlights_best_per_column():
    rows = {"uncal": {"ece": 0.05, "miou": 0.5}, "ts": {"ece": 0.02, "miou": 0.5}, "bad": {"ece": 0.09, "miou": 0.4}}
    table = metrics_table(rows, ("ece", "miou"))
    assert '<td class="best">0.0200</td>' in table
    assert table.count('class="best"') == 3  # ts ece, and the tie on miou for uncal + ts
    assert '<td class="best">0.0900</td>' not in table


def test_render_report_embeds_everything(tmp_path):
    pytest.importorskip("matplotlib")
    results = {
        "meta": {"model": "toy", "dataset": "synthetic"},
        "class_names": ["a", "b", "c"],
        "calibration": {"test": {"uncal": {"ece": 0.1, "reliability": _reliability(), "per_class_ece": [0.1, 0.2, 0.3]},
                                 "ts": {"ece": 0.05, "reliability": _reliability(), "per_class_ece": [0.1, 0.1, 0.1]}}},
        "detection": {"idm": {"msp": {"auroc": 0.9, "ap": 0.5, "fpr95": 0.3, "roc": [[0, 0.5, 1], [0, 0.9, 1]],
                                      "pr": [[0, 0.5, 1], [1, 0.7, 0.2]]}}},
        "shift": {"gaussian_noise": {"0": {"ece": 0.05}, "3": {"ece": 0.1}, "5": {"ece": 0.2}}},
        "examples": [],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = render_report(tmp_path)
    text = out.read_text()
    assert out.name == "index.html"
    # 2 reliability + 1 per-class + ROC + PR + 1 severity curve, all inline
    assert text.count("data:image/png;base64,") == 6
    assert "src=\"http" not in text and "src='http" not in text


def test_render_report_without_results_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        render_report(tmp_path)
