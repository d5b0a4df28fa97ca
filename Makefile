# Every target bootstraps .venv first: it is created, or re-installed when
# pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: setup check-env run test unit nbval lab student clean

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
	$(PY) -m fusionlib.experiments run $(NOTEBOOKS)

test: check-env
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

unit: check-env
	$(PY) -m pytest tests -p no:cacheprovider

nbval: check-env
	$(PY) -m pytest notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

lab: check-env
	$(PY) -m jupyter lab notebooks

# Workshop handout: notebooks with exercise solutions emptied, outputs cleared.
student: $(STAMP)
	$(PY) -m fusionlib.editions notebooks student

clean:
	rm -rf $(VENV) runs student .pytest_cache
