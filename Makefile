# geoseg: one command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo
export HF_HUB_OFFLINE := 1

.PHONY: install demo demo-synthetic test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,cluster,notebook]"
	touch $@

install: $(BIN)/.installed

demo: install
	BIN=$(BIN) bash scripts/demo.sh $(DEMO)

demo-synthetic: install
	BIN=$(BIN) bash scripts/demo_synthetic.sh $(DEMO)-synthetic

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/predict_throughput.py

clean:
	rm -rf $(DEMO) $(DEMO)-synthetic .pytest_cache
