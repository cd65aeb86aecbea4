"""Every row of docs/hardening.md must keep raising the documented, clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "hardening_table", Path(__file__).resolve().parents[1] / "scripts" / "hardening_table.py")
hardening = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(hardening)


@pytest.mark.parametrize(("what", "where", "fn", "expected"), hardening.CASES, ids=[c[0] for c in hardening.CASES])
def test_bad_input_raises_the_documented_error(what, where, fn, expected):
    with pytest.raises(expected) as info:
        fn()
    assert len(str(info.value)) > 15  # a message a person can act on, not a bare type


MINE = {"1", "2", "6", "7", "8"}  # fixed in the `fixes` round; the others' rows report their own status


@pytest.mark.parametrize("row", [r for r in hardening.ISSUE12 if r[0] in MINE], ids=lambda r: f"issue12-{r[0]}")
def test_issue12_fixed_rows_hold(row):
    assert row[3]()  # raises (AssertionError or the defect's own error) if the defect came back


def test_hardening_doc_has_a_row_for_every_issue12_item():
    assert [r[0] for r in hardening.ISSUE12] == [str(i) for i in range(1, 15)]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "hardening.md").read_text()
    for i in range(1, 15):
        assert f"\n| {i} | " in doc, f"docs/hardening.md lacks the issue-12 row {i}; rerun scripts/hardening_table.py"
