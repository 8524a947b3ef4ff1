# The two commands a fresh machine needs are `make run` and `make test`;
# everything else is a step they take.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
export PYTHONUNBUFFERED := 1

.PHONY: run test up down status venv migrate lint typecheck bench compose-check clean browser

$(VENV_STAMP): pyproject.toml
	@command -v python3 >/dev/null || { echo "make: python3 (>= 3.11) is required" >&2; exit 1; }
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: python3 >= 3.11 is required, found $$(python3 --version)" >&2; exit 1; }
	@[ -x $(PY) ] || python3 -m venv .venv
	@echo "make: installing Python packages into .venv"
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV_STAMP)

up: venv
	@stack/stack.sh up

down:
	@stack/stack.sh down

status:
	@stack/stack.sh status

migrate: up
	@$(PY) -m writer migrate

run: migrate
	@$(PY) stack/run.py

test: migrate browser
	@$(PY) -m pytest $(PYTEST_ARGS)

# headless Chromium (Debian's package) for the status page test
browser:
	@command -v chromium >/dev/null || { echo "make: installing Debian's chromium (for the status page test)"; \
		{ [ -f .local/.apt-updated ] || apt-get update -qq; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

lint: venv
	@.venv/bin/ruff check writer cdc projections tests bench

typecheck: venv
	@.venv/bin/mypy writer cdc projections

bench: migrate
	@$(PY) -m bench.writer_load

compose-check:
	@stack/compose-check.sh

clean: down
	rm -rf .local
