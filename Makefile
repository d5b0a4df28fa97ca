# Every target bootstraps .venv first: it is created, or re-installed when
# pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

# JupyterLab for the course: the settings in jupyter/labconfig/ (no "get notified
# about official Jupyter news?" toast, no update check), and --allow-root when
# running as root, as in workshop containers.
LAB_ENV   := JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter$(if $(JUPYTER_CONFIG_PATH),:$(JUPYTER_CONFIG_PATH))"
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root)
# Tests run two at a time under `make test` (--dist loadscope): the cells of a notebook stay on one worker,
# each test module and each notebook's smoke run (one class per notebook) is one unit of work.
# `make test JOBS=1` runs them one after another.
JOBS ?= 2
XDIST = $(if $(filter-out 0 1,$(JOBS)),-n $(JOBS) --dist loadscope)

.PHONY: setup check-env run test unit nbval browser lab lab-student student facilitator guide cache clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision are installed in this one call, so pip picks a matching pair.
	$(PY) -m pip install -e ".[dev]"
	@touch $@

setup: $(STAMP)

# Fails loudly, first thing, when torchvision cannot import or run its ops.
check-env: $(STAMP)
	@$(PY) -m fusionlib.env --check

run: check-env
	$(PY) -m fusionlib run $(NOTEBOOKS)

# Unit tests and notebooks first; then JupyterLab in a browser, once the trained-model cache is warm.
test: check-env
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider $(XDIST) --durations=20 \
		--ignore=tests/test_browser.py
	$(PY) -m pytest tests/test_browser.py -p no:cacheprovider

unit: check-env
	$(PY) -m pytest tests -p no:cacheprovider --ignore=tests/test_browser.py

nbval: check-env
	$(PY) -m pytest notebooks --nbval-lax --nbval-current-env -p no:cacheprovider $(XDIST)

# Runs notebook 00 and a student notebook in headless Chromium (screenshots in artifacts/browser/).
browser: check-env
	$(PY) -m pytest tests/test_browser.py -p no:cacheprovider -v

# The full edition (with solutions), as the course is written.
lab: check-env
	$(LAB_ENV) $(PY) -m jupyter lab $(LAB_FLAGS) notebooks

# The students' edition; generated first if student/ has no notebooks yet.
lab-student: check-env
	@ls student/[0-9]*.ipynb >/dev/null 2>&1 || $(MAKE) --no-print-directory student
	$(LAB_ENV) $(PY) -m jupyter lab $(LAB_FLAGS) student

# Workshop handout: solutions replaced by stubs, written answers by prompts, outputs cleared.
# Never overwrites a notebook a student edited; `make student FORCE=1` does, after a backup (FORCE=0 does not).
student: $(STAMP)
	$(PY) -m fusionlib.editions notebooks student $(if $(filter 1 yes true,$(FORCE)),--force)

# For the facilitator: the full notebooks, facilitator/answers.md (every solution and written answer) and
# facilitator/workshop.md (the guide, docs/workshop.md).
facilitator: $(STAMP)
	$(PY) -m fusionlib.editions --edition facilitator notebooks facilitator $(if $(filter 1 yes true,$(FORCE)),--force)

# The facilitator's guide (docs/workshop.md): its agendas from the newest `make run` summary of each notebook
# under RUNS, its typical mistakes from tests/exercise_answers/. `make guide RUNS=elsewhere/runs`.
RUNS ?= runs
guide: $(STAMP)
	$(PY) -m fusionlib.guide --runs $(RUNS) --doc docs/workshop.md

# A model cache for a room: every notebook run once with FUSIONLIB_CACHE=$(CACHE), so every model the notebooks
# train at their defaults is in it; then made readable by all. Learners set FUSIONLIB_CACHE=$(CACHE) (read-only is
# fine: a missing entry trains into their private cache). The runs go to runs/cache-<timestamp>/, not runs/<timestamp>/.
CACHE ?= $(HOME)/.cache/fusionlib-shared
cache: check-env
	FUSIONLIB_CACHE="$(CACHE)" $(PY) -m fusionlib run $(NOTEBOOKS) --out runs/cache-$(shell date +%Y%m%d-%H%M%S)
	chmod -R a+rX "$(CACHE)"
	@echo "model cache ready: export FUSIONLIB_CACHE=$(CACHE)"

# Keeps student/ (student work) and facilitator/.
clean:
	rm -rf $(VENV) runs .pytest_cache artifacts
