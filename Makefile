# Two entry points (see README): `make demo` runs the main job, `make test` runs the suite.
# Both create .venv and install pinned dependencies on first use (torch CPU build via constraints/cpu.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# glibc hugepage tuning roughly halves ESPNet step time on these CPUs (measured, see docs/performance.md).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export SEGCAL_DATA ?= $(abspath ../shared/data)

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints/cpu.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/segcal demo --out demo-out

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
