# The README's two commands: `make demo` (the main job, end to end) and `make test`.
# Both create the virtualenv and install the package first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
DEMO_DIR ?= demo_out

.PHONY: demo test lint format clean

$(STAMP): setup.py launch/setup_env.sh
	PYTHON=$(PYTHON) bash launch/setup_env.sh $(VENV)
	touch $(STAMP)

# The demo is a CPU job; `make demo JAX_PLATFORMS=cuda` runs it on a GPU. Naming the
# platform also keeps libtpu (installed for AOT compiles) from probing for a TPU.
JAX_PLATFORMS ?= cpu
demo: $(STAMP)
	JAX_PLATFORMS=$(JAX_PLATFORMS) $(BIN)/python -m launch.demo --out=$(DEMO_DIR)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(DEMO_DIR)
