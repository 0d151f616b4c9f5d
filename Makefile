# The two commands of the README. Each installs what it needs (idempotent; a stamp file skips repeats).
#   make demo   - train 2d-tiny on the embedded dataset, then a tiny GPT on its codes: samples, gFID, AR probe
#                 (about 5 minutes on a 2-core CPU)
#   make test   - the test suite, including a real two-node Slurm cluster started on this machine
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokscale-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint slurm-packages clean

$(STAMP): requirements/cpu.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tokscale demo

slurm-packages:
	bash jobs/local_cluster.sh install

test: install slurm-packages
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
