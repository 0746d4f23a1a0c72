# The two front doors (README): `make demo` and `make test`. Both set up everything they need.
PY := .venv/bin/python
SHELL := /bin/bash

.PHONY: setup demo test lint unit kernel bench image clean

setup:
	scripts/system-deps.sh
	scripts/venv.sh

demo: setup
	$(PY) -m infertap.cli.main demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy -p infertap
	.venv/bin/mypy tests benchmarks

# pytest's console script, not `python -m pytest`: that would put the repository root on the
# path and make agent/ and cli/ importable as a second copy of infertap.
PYTEST := .venv/bin/pytest

test: setup lint
	$(PYTEST) -q

unit: setup
	$(PYTEST) -q -m "not kernel"

kernel: setup
	$(PYTEST) -q -m kernel

# The agent image (localhost/infertap/agent:0.1.0) from Debian packages and this checkout, with
# podman, no registry: see scripts/build-image.sh. tests/kernel/test_container.py runs it.
image: setup
	scripts/build-image.sh

bench:
	scripts/system-deps.sh bench
	scripts/venv.sh
	$(PY) -m benchmarks.datapath
	$(PY) -m benchmarks.h2walk
	$(PY) -m benchmarks.polyfill
	$(PY) -m benchmarks.inspector
	$(PY) -m benchmarks.tls
	$(PY) -m benchmarks.overload --workers 1 2

clean:
	rm -rf .venv build *.egg-info agent/api/*_pb2*.py agent/api/*_pb2.pyi
