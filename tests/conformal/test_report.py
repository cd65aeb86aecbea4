"""The report section renders evaluate()'s JSON, self-contained and escaped."""

from __future__ import annotations

from segcal.conformal import CoverageRiskControl, evaluate
from segcal.report.conformal import section

from ._synthetic import make_data


def test_section_renders_tables_plots_and_escapes_text() -> None:
    z, y = make_data(40, seed=2)
    res = evaluate(CoverageRiskControl(alpha=0.2, n_grid=101, batch_size=40), (z[:20], y[:20]),
                   {"<b>test</b>": (z[20:], y[20:])}, subsets={"seq<script>": ["0", "1", "2"]},
                   class_names=["sky", "road", "car", "a&b"], alphas=(0.1, 0.2), n_examples=1)
    page = section({"conformal": res})
    assert page.startswith('<section id="conformal">') and page == section(res)
    assert "&lt;b&gt;test&lt;/b&gt;" in page and "<b>test</b>" not in page
    assert "seq&lt;script&gt;" in page and "<script>" not in page
    assert "a&amp;b" in page
    assert page.count("data:image/png;base64,") == 2  # risk vs α and the set-size map
    assert "per image, not per pixel" in page
    assert f"{res['threshold']:.5f}" in page
    assert section({}) == "" and section({"conformal": None}) == ""
    two = section({"conformal": {"a": res, "b": res}})
    assert two.count("<h3>") == 2
