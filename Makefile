# One venv for everything; torch 2.14.1 + torchvision 0.29.1 are the pair that installs offline here.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test bench browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $@

# Chromium for the end-to-end dashboard test (Debian packages; skipped where apt is unavailable).
browser:
	@command -v chromium >/dev/null || { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || echo "chromium not installed: browser test will be skipped"; }

demo: setup
	$(VENV)/bin/clip-atlas demo

test: setup browser
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --dist loadscope -m "not serial"
	OMP_NUM_THREADS=1 $(PY) -m pytest -m serial

bench: setup
	$(PY) benchmarks/decompose.py
