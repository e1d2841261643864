# The two commands of the README. Both create .venv themselves on a machine with only Python.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel available here; the package itself accepts torch>=2.6.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint schema clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moespec validate specs/*.yaml
	$(BIN)/moespec explain specs/mixtral-8x7b.yaml d_model=512 layer.experts.routed.0.d_ff=1024

test: $(STAMP)
	$(BIN)/python -m ruff check moespec tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/python -m ruff check moespec tests benchmarks

schema: $(STAMP)
	$(BIN)/moespec schema -o schemas/moespec.v1.schema.json

clean:
	rm -rf $(VENV) build dist *.egg-info
