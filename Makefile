# The README's two commands live here: `make up` (the main job) and `make test` (the test suite).
# Everything the project needs is installed by these targets; nothing is expected on the machine by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: install data test lint up bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the machine has a CPU wheel of 2.13.0; an unpinned torch pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# System data and tools from Debian: Fashion-MNIST, real PE files (NSIS, MinGW runtime DLLs), and
# docker-compose to validate docker-compose.yml (no Docker engine runs here).
data:
	@if [ ! -d $(FASHION) ] || [ ! -d /usr/share/nsis ] || [ ! -d /usr/lib/gcc/x86_64-w64-mingw32 ] \
		|| ! command -v docker-compose >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				dataset-fashion-mnist nsis gcc-mingw-w64-x86-64-win32-runtime docker-compose >/dev/null; \
		else echo "not root: apt-get install dataset-fashion-mnist nsis gcc-mingw-w64-x86-64-win32-runtime docker-compose"; fi; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install data lint
	$(BIN)/pytest

up: install data
	bash scripts/up.sh

bench: install data
	$(BIN)/python -m bench.embed

clean:
	rm -rf $(VENV) .pytest_cache
