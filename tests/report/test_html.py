import json
import os
import sys
import types

import _fixture  # tests/report is on sys.path (pytest's "prepend" import mode, no __init__.py here)
import pytest

from segcal.report import metrics_table, render_report
from segcal.report.html import best_values, bootstrap_statement, class_palette

pytest.importorskip("matplotlib")


def _render(tmp_path, data=None) -> str:
    return render_report(_fixture.write(tmp_path, data)).read_text()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    """The full fixture page, rendered once for the tests that only read it."""
    return _render(tmp_path_factory.mktemp("page"))


def test_metrics_table_highlights_best_per_column():
    rows = {"uncal": {"ece": 0.05, "miou": 0.5}, "ts": {"ece": 0.02, "miou": 0.5}, "bad": {"ece": 0.09, "miou": 0.4}}
    table = metrics_table(rows, ("ece", "miou"))
    assert '<td class="best">0.0200</td>' in table
    assert table.count('class="best"') == 3  # ts ece, and the tie on miou for uncal + ts
    assert '<td class="best">0.0900</td>' not in table


def test_best_is_direction_aware():
    rows = {"a": {"ece": -0.01, "oe": 0.0, "miou": 0.6, "auroc": 0.7, "fpr95": 0.4, "nll": 0.5, "accuracy": 0.9},
            "b": {"ece": 0.03, "oe": 0.2, "miou": 0.5, "auroc": 0.9, "fpr95": 0.2, "nll": 0.3, "accuracy": 0.9}}
    best = best_values(rows, ("ece", "oe", "miou", "auroc", "fpr95", "nll", "accuracy", "unknown"))
    assert best["ece"] == -0.01  # closest to 0, not the smallest
    assert best["miou"] == 0.6 and best["auroc"] == 0.9  # largest
    assert best["fpr95"] == 0.2 and best["nll"] == 0.3  # smallest
    assert "oe" not in best  # one-sided: 0 for any under-confident model, never "best"
    assert "accuracy" not in best  # all equal: nothing to rank
    assert "unknown" not in best


def test_page_has_title_sections_glossary_and_figures(page):
    text = page
    assert "<h1>segcal report — tiny-net on blocks</h1>" in text
    # 4 + 2 reliability, 2 per-class, ROC + PR, 1 severity (= 11 figures), 5 example panels
    assert text.count("data:image/png;base64,") == 16
    assert "src=\"http" not in text and "src='http" not in text
    assert 'id="glossary"' in text and "over-confidence error" in text and "temperature scaling" in text
    assert "flowenedet-c</b>: the model gives no features" in text  # skipped stages listed
    assert "Configuration of the run" in text


def test_subset_reliability_diagrams_are_collapsed(page):
    text = page
    assert "<details open><summary>Reliability diagrams — test (all)" in text
    assert "<details><summary>Reliability diagrams — test seqA" in text


def test_no_question_marks_when_meta_is_missing(tmp_path):
    text = _render(tmp_path, {"calibration": {}})
    assert "? on ?" not in text and "<h1>segcal report</h1>" in text
    assert "no meta.model / meta.dataset" in text
    assert "No calibration results in results.json" in text and "No detection results" in text
    text = _render(tmp_path, {"meta": {"model": "m"}})
    assert "<h1>segcal report — m</h1>" in text and "no meta.dataset" in text


def test_class_names_come_from_results(page, tmp_path):
    for name in _fixture.CLASS_NAMES:
        assert f"</span>{name}</span>" in page  # class legend next to the segmentation panels
    assert "rgb(70, 130, 180)" in page  # meta.palette colours the legend
    data = _fixture.results()
    data = {"meta": data["meta"], "class_names": ["only", "two"],
            "calibration": {"t": {m: {"ece": r["ece"], "per_class_ece": r["per_class_ece"]}
                                  for m, r in data["calibration"]["test (all)"].items()}}}
    text = _render(tmp_path, data)
    assert "2 class names for 4 classes" in text


def test_default_palette_is_deterministic_and_distinct():
    assert class_palette(12) == class_palette(12)
    assert len(set(class_palette(30))) == 30


def test_scalar_panels_get_a_colorbar(page):
    text = page
    assert text.count('class="cbar"') == 2  # confidence and score: msp
    assert "rank-normalised" in text


def test_panel_paths_are_confined_to_the_results_folder(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG SECRET-BYTES")
    root = tmp_path / "run"
    root.mkdir()
    (root / "examples").mkdir()
    os.symlink(secret, root / "examples" / "link.png")
    data = {"meta": {"model": "m", "dataset": "d"}, "examples": [{"name": "evil", "panels": {
        "absolute": str(secret), "dotdot": "../secret.png", "symlink": "examples/link.png", "none": None,
        "fine": "examples/img0_gt.png"}}]}
    text = _render(root, data)
    import base64
    assert base64.b64encode(secret.read_bytes()).decode()[:12] not in text
    assert text.count("refused") == 4
    assert text.count("data:image/png;base64,") == 1  # the panel inside the folder is shown


def test_bootstrap_statements_in_summary(page):
    text = page
    assert "<b>TS</b> beats uncalibrated by 0.031 ECE [0.024, 0.038], 95 %" in text
    assert "VS vs uncalibrated: no significant difference in ECE" in text
    assert "lowest ECE: <b>VS</b> 0.0290; <i>not significantly different from uncalibrated</i>" in text
    assert "no uncertainty estimate" in text  # test seqA has no bootstrap entry
    assert "ECE -0.0020 [-0.0060, +0.0030] n.s." in text  # table column


def test_bootstrap_statement_directions():
    worse = {"metric": "ece", "diff": 0.01, "low": 0.004, "high": 0.017, "level": 0.95, "significant": True}
    assert "LTS</b> is worse than uncalibrated by 0.010 ECE [0.004, 0.017], 95 %" in bootstrap_statement("lts", worse)
    gain = {"metric": "miou", "diff": 0.02, "low": 0.01, "high": 0.03, "level": 0.9, "significant": True}
    assert "beats uncalibrated by 0.020 mIoU [0.010, 0.030], 90 %" in bootstrap_statement("ts", gain)


def test_conformal_section_is_optional(tmp_path, monkeypatch):
    data = {"meta": {"model": "m", "dataset": "d"}, "conformal": {"coverage": 0.9}}
    monkeypatch.setitem(sys.modules, "segcal.report.conformal", None)  # absent module: skipped, no crash
    assert "CONFORMAL" not in _render(tmp_path, data)
    fake = types.ModuleType("segcal.report.conformal")
    fake.section = lambda results: f"<h2>CONFORMAL {results['conformal']['coverage']}</h2>"
    monkeypatch.setitem(sys.modules, "segcal.report.conformal", fake)
    assert "<h2>CONFORMAL 0.9</h2>" in _render(tmp_path, data)


def test_legacy_counts_key_still_renders(tmp_path):
    rel = _fixture.reliability()
    rel["counts"] = rel.pop("count")
    data = {"meta": {"model": "m", "dataset": "d"}, "calibration": {"t": {"uncalibrated": {"ece": 0.1,
                                                                                            "reliability": rel}}}}
    assert _render(tmp_path, data).count("data:image/png;base64,") == 1


def test_render_report_without_results_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        render_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        render_report(tmp_path)
