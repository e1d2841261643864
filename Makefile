# The two commands of the README. Both create .venv themselves on a machine with only Python.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel available here; the package itself accepts torch>=2.6.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint schema docs clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

DEMO_OUT := out/mixtral-small

demo: $(STAMP)
	$(BIN)/moespec validate specs/*.yaml
	$(BIN)/moespec build specs/mixtral-8x7b.yaml d_model=256 layer.experts.routed.0.d_ff=512 \
		target.dtype=fp32 --layer layer -o $(DEMO_OUT) --force
	$(BIN)/python -c "import moespec, torch; m = moespec.load('$(DEMO_OUT)'); \
		x = torch.randn(4, 64, 256); y = m(x); (y.square().mean() + m.aux_loss).backward(); \
		g = m.get_parameter('experts.0.w_up').grad; \
		print(f'moespec.load($(DEMO_OUT)): {tuple(x.shape)} -> {tuple(y.shape)}, ' \
		f'aux_loss {m.aux_loss.item():.4f}, |grad w_up| {g.norm().item():.3g}')"
	$(BIN)/moespec bench $(DEMO_OUT) --tokens 512 --repeat 5

test: $(STAMP)
	$(BIN)/python -m ruff check moespec tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/python -m ruff check moespec tests benchmarks

schema: $(STAMP)
	$(BIN)/moespec schema -o schemas/moespec.v1.schema.json

docs: $(STAMP)
	$(BIN)/python -m moespec.spec.docgen

clean:
	rm -rf $(VENV) build dist *.egg-info
