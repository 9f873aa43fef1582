# The two commands of the README:  `make run`  and  `make test`.
# Both create .venv on first use. On a machine without a GPU, torch==2.13.0 is the CPU build
# (a plain `pip install torch` would pull several GB of CUDA wheels); it is installed first
# so that the project's torch range is already satisfied.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job on the embedded default: plan the tiny GPT on this machine (8 short real
# trials, a study in plans/studies.db that a second `make run` resumes), then train with the
# plan on the corpus built from this machine's Python sources.
run: setup
	$(VENV)/bin/autotune plan --workload tiny --trials 8 --out plans/tiny.plan.json
	$(VENV)/bin/autotune run plans/tiny.plan.json --tokens 2000000 --out runs/$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs plans
