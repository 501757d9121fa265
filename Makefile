# The two set-up commands of the README. Both create .venv/ first if it is missing.
.PHONY: demo test test-slow lint env

env:
	@bash scripts/setup_env.sh

demo: env
	.venv/bin/ar2dlm run recipe=demo

test: env
	.venv/bin/python -m pytest -q

test-slow: env
	.venv/bin/python -m pytest -q -m "slow or multiprocess"

lint: env
	.venv/bin/ruff check ar2dlm tests benchmarks
