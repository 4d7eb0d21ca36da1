# kiln — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
DEMO ?= demo
PORT ?= 8765
PYTEST_ARGS ?=

.PHONY: venv dev test test-slow test-gpu demo lint clean mutate

venv: $(VENV)/.installed

# torch/torchvision first, pinned: pip takes them from this machine's disk (a CUDA build that runs on CPU).
# PYTHONWARNINGS silences setuptools' editable-install banner, which is not about anything the user did.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	PYTHONWARNINGS=ignore $(PIP) install -e ".[train,export,serve]"
	rm -f $(VENV)/.dev-installed
	touch $@

# The test and lint tools, on top of the demo's venv.
# tensorrt-stubs (type checking only) is installed without its dependency on the real TensorRT wheels.
dev: $(VENV)/.dev-installed

$(VENV)/.dev-installed: $(VENV)/.installed
	PYTHONWARNINGS=ignore $(PIP) install -e ".[train,export,serve,dev]"
	$(PIP) install --no-deps tensorrt-stubs
	touch $@

test: dev
	$(BIN)/pytest -m "not slow and not gpu and not trt" -q $(PYTEST_ARGS)

test-slow: dev
	$(BIN)/pytest -m "slow" -q $(PYTEST_ARGS)

# Mutation testing, not part of `make test`: tools/mutate.py runs mutmut module by module on a copy laid
# out as the installed package, against the tests [tool.kiln.mutate] in pyproject.toml names for each
# (docs/testing.md: scores, equivalent mutants, duration). MUTATE="batcher bundle" runs some modules.
mutate: dev
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/python tools/mutate.py --jobs $${MUTATE_JOBS:-2} $(MUTATE)

# On a machine with an NVIDIA GPU (and TensorRT for the trt marker).
test-gpu: dev
	$(BIN)/pytest -m "gpu or trt" -q $(PYTEST_ARGS)

# tensorrt-stubs ships no py.typed and stubs mypy cannot parse: tools/mypy_stubs.py writes a fixed copy first.
lint: dev
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider tests/core/test_layers.py
	$(BIN)/python tools/mypy_stubs.py .kiln-cache/mypy-stubs
	MYPYPATH=.kiln-cache/mypy-stubs $(BIN)/mypy kiln train export serve calib

# Train lenet5 on the bundled digits, evaluate, export fp32/fp16/int8 ONNX, serve it, send one request, benchmark.
demo: venv
	rm -rf $(DEMO)/digits
	$(BIN)/kiln train --data digits --model lenet5 --out $(DEMO)/digits --no-progress
	$(BIN)/kiln eval $(DEMO)/digits --no-table
	$(BIN)/kiln export $(DEMO)/digits --precision fp32,fp16,int8
	$(BIN)/kiln eval $(DEMO)/digits
	$(BIN)/kiln data sample digits --out $(DEMO)/samples
	@set -e; \
	$(BIN)/kiln serve $(DEMO)/digits --name digits --port $(PORT) --drain-s 0 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid' EXIT; \
	for i in $$(seq 1 120); do curl -fs http://127.0.0.1:$(PORT)/readyz >/dev/null && break; sleep 0.5; done; \
	echo "POST /v1/models/digits/predict (multipart $(DEMO)/samples/digit-7-7.png):"; \
	curl -fsS -F file=@$(DEMO)/samples/digit-7-7.png http://127.0.0.1:$(PORT)/v1/models/digits/predict; echo
	$(BIN)/kiln bench $(DEMO)/digits --backend all --precision fp32,int8 --batch 1,8,32 --iters 50 --warmup 10

clean:
	rm -rf $(DEMO) runs .pytest_cache .mypy_cache .ruff_cache build *.egg-info
