# Two commands do everything on a fresh clone:
#   make demo   installs into .venv, then runs both stages on the embedded model and corpus (offline)
#   make test   installs into .venv, then runs the test suite (offline, CPU)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) generate_test_data.py
	$(PY) basic_l1_sweep.py --overwrite --batch_size 1024 --n_repetitions 4
	$(PY) evaluate_sweep.py --sweep outputs/sweep

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/generate.py
	$(PY) bench/sweep.py

clean:
	rm -rf activation_data/* outputs/*
