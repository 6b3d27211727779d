# Two commands matter: `make demo` (Task 1 end to end) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
IMGCLS := $(VENV)/bin/imgcls
DATA ?= data/fashion-mnist
RUNS ?= runs
PRESET ?= quick
CELL_BUDGET ?=

.PHONY: demo test env system-packages clean-demo

# Debian packages: Fashion-MNIST's IDX files and a headless browser for the UI tests.
system-packages:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  need=""; for p in dataset-fashion-mnist chromium chromium-driver; do \
	    dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	  if [ -n "$$need" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; fi; \
	else echo "not root or no apt-get: install dataset-fashion-mnist and chromium yourself if needed"; fi

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

env: system-packages $(VENV)/.installed

$(DATA)/train/train.csv: | env
	$(IMGCLS) data fashion-mnist $(DATA)

demo: env $(DATA)/train/train.csv
	$(PY) -m imgcls.demo --data $(DATA) --runs $(RUNS) --preset $(PRESET) $(if $(CELL_BUDGET),--cell-budget $(CELL_BUDGET))

test: env
	$(VENV)/bin/pytest -q tests

clean-demo:
	rm -rf $(RUNS)/demo-*
