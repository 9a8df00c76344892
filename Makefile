# nanochat-hydra: `make demo` runs the CPU demo pipeline, `make test` runs the test suite.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench serve clean slurm-2node slurm-2node-down

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned, so nothing resolves an unpinned (CUDA) torch on CPU machines
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/nanochat-run experiment=cpu_demo

# serve the model `make demo` trained (newest completed rl > sft > mid run under runs/): http://127.0.0.1:8000/
serve: setup
	$(VENV)/bin/nanochat-run stage=serve $(SERVE_ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/train_step.py
	$(VENV)/bin/python bench/loader.py
	$(VENV)/bin/python bench/tokenizer_train.py
	$(VENV)/bin/python bench/download.py
	$(VENV)/bin/python bench/serve.py

# the two-node Slurm test cluster (network namespaces; root, after .ci/slurm_up.sh)
slurm-2node:
	bash .ci/slurm_2node.sh

slurm-2node-down:
	bash .ci/slurm_2node.sh --down

clean:
	rm -rf runs outputs multirun .pytest_cache
