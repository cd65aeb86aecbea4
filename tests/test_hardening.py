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
