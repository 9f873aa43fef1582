# The two commands of the README:  `make run`  and  `make test`.
# Both create .venv on first use. On a machine without a GPU, torch==2.13.0 is the CPU build
# (a plain `pip install torch` would pull several GB of CUDA wheels); it is installed first
# so that the project's torch range is already satisfied.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The XLA environment (TPUs through torch-xla, tested on XLA's CPU backend): its own, since
# torch-xla 2.9 runs only on torch 2.9 (README, "TPUs through torch-xla").
XLA_VENV ?= .venv-xla

.PHONY: setup xla-env run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# One command, cached like .venv: torch 2.9.1 and torch-xla 2.9.0 (pyproject's [xla]), the
# project editable, pytest. PyPI's torch 2.9.1 is the CUDA build (it runs without a GPU) with its
# nvidia-* wheels: about 4 GB of wheels, 7.2 GB installed, 2-3 minutes from scratch here.
xla-env: $(XLA_VENV)/.installed

$(XLA_VENV)/.installed: pyproject.toml
	rm -rf $(XLA_VENV)
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install -q -e ".[xla]" "pytest>=8" "pytest-timeout>=2.3"
	touch $@

# The main job on the embedded default: plan the tiny GPT on this machine (8 short real
# trials, a study in plans/studies.db that a second `make run` resumes), then train with the
# plan on the corpus built from this machine's Python sources.
run: setup
	$(VENV)/bin/autotune plan --workload tiny --trials 8 --out plans/tiny.plan.json
	$(VENV)/bin/autotune run plans/tiny.plan.json --tokens 2000000 --out runs/$$(date +%Y%m%d-%H%M%S)

# DeepSpeed compiles its CPU ops (ZeRO-Offload's CPU Adam, the shared-memory collectives) on
# first use, about a minute on 2 cores; the tests' ZeRO cases use both. Built once here, with
# the environment, as DeepSpeed recommends for production (pre-built ops), not inside a test's
# time limit. Best effort: where they cannot build, the first ZeRO run builds them or says why.
$(VENV)/.deepspeed-ops: $(VENV)/.installed
	@echo "building DeepSpeed's CPU ops once (about 2 minutes)…"
	-$(PY) -c "from deepspeed.accelerator import get_accelerator as a; [b.load() for n in ('CPUAdamBuilder', 'ShareMemCommBuilder') if (b := a().create_op_builder(n)) is not None and b.is_compatible()]" >/dev/null 2>&1
	touch $@

# Layout and lint first (ruff, configured in pyproject.toml): seconds, before minutes of tests.
# Then the tests on TEST_WORKERS pytest-xdist workers: most tests are one single-threaded
# process, so two workers keep CI's two cores busy; tests sharing a module's fixture stay on one
# worker (tests/conftest.py), and each worker's planners have their own device locks. The few
# tests marked serial (a budget sized for an idle machine) run after them, alone.
# The XLA tests (tests/xla/) run in their own environment on XLA's CPU backend, as one test of
# the main suite (tests/test_xla_environment.py), beside the others. No skip: without the
# environment, this fails.
TEST_WORKERS ?= 2
test: setup $(VENV)/.deepspeed-ops $(XLA_VENV)/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 -m "not serial"
	$(PY) -m pytest -q -m serial

clean:
	rm -rf $(VENV) $(XLA_VENV) runs plans
