# Two commands for a new user: `make demo` and `make test` (each creates .venv when missing).
# GPU users: install the CUDA build of torch that fits your driver first, then
#   make demo TORCH=   (an empty TORCH keeps the torch you installed)
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/fedpriv: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	test -z "$(TORCH)" || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/fedpriv

install: $(BIN)/fedpriv

demo: install
	$(BIN)/fedpriv simulate

# pytest exits 5 when it collects nothing: that must fail, never pass silently.
test: install
	$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/python .ci/lint_imports.py

clean:
	rm -rf $(VENV) runs .pytest_cache
