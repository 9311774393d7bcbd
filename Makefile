# Two commands do everything on a fresh clone:
#   make demo   installs into .venv, then runs both stages on the embedded model and corpus (offline)
#   make test   installs into .venv, then runs the test suite (offline, CPU)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# SAELens pins transformer-lens < 4, so the interop check runs it in a venv of its own, outside the checkout
SAELENS_VENV ?= $(abspath ..)/venv-saelens
INTEROP_DIR ?= $(abspath outputs)/interop-check

.PHONY: install demo test bench clean interop

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

$(SAELENS_VENV)/.installed:
	$(PYTHON) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SAELENS_VENV)/bin/python -m pip install --quiet torch==2.13.0 sae-lens
	touch $@

# export every architecture we train, load it with SAELens; save SAELens' own SAEs, load them with ours;
# each direction fails unless encode and decode agree within 1e-5 (max abs difference); and SAELens' eval metrics
# of the exports on a toy model must equal our evaluation's within 1e-4 relative (+ 1e-5)
interop: install $(SAELENS_VENV)/.installed
	rm -rf $(INTEROP_DIR) && mkdir -p $(INTEROP_DIR)
	$(PY) tests/interop/ours.py export $(INTEROP_DIR)
	$(SAELENS_VENV)/bin/python tests/interop/check_saelens.py check-export $(INTEROP_DIR)
	$(SAELENS_VENV)/bin/python tests/interop/check_saelens.py check-metrics $(INTEROP_DIR)
	$(SAELENS_VENV)/bin/python tests/interop/check_saelens.py make-native $(INTEROP_DIR)
	$(PY) tests/interop/ours.py check-native $(INTEROP_DIR)

bench: install
	$(PY) bench/generate.py
	$(PY) bench/sweep.py

clean:
	rm -rf activation_data/* outputs/*
