# polyak: everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: install demo test contract sdist-check lint docs bench clean

install: $(STAMP)

# torch goes in first and pinned: the machine then takes its local CPU build instead of a CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[demo,dev]" "$(TORCH_PIN)"
	# ignite's own tests ship in its source distribution: tests/test_ignite_upstream.py runs them on polyak
	$(PY) -m pip download --quiet --no-deps --no-binary :all: --dest $(VENV)/sdists \
		"pytorch-ignite==$$($(PY) -c 'import ignite; print(ignite.__version__)')"
	# timm needs torchvision (none for this torch): tests/_timm.py loads its EMA classes from the wheel alone
	$(PY) -m pip download --quiet --no-deps --only-binary :all: --dest $(VENV)/wheels "timm==1.0.31"
	touch $(STAMP)

demo: install
	$(PY) -m polyak demo

# two workers (pytest-xdist): the suite takes about half the time on the 2 cores of the CI machine
test: install
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q -n 2

# the contract suites (tests/contract/) with the deep hypothesis profile: thousands of examples (make test runs
# them with the short CI profile)
contract: install
	POLYAK_CONTRACT=deep $(PY) -m pytest -q -p no:xdist tests/contract

# CI's second step: the source distribution built, unpacked into a clean folder and tested there
sdist-check: install
	.ci/sdist-check

lint: install
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

# the documentation site (Sphinx, MyST pages in docs/, the API from the docstrings); warnings are errors
docs: install
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

bench: install
	$(PY) -m pip install --quiet -e ".[bench]" "$(TORCH_PIN)"
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build
