#!/usr/bin/env bash
# Create .venv/ at the repository root with ar2dlm and its CPU dependencies, unless it is already
# up to date. Safe to run repeatedly; it reinstalls only when the requirement files change.
# GPU machines: see README, "Installing on GPU machines".
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${AR2DLM_TORCH_SPEC:-torch==2.13.0}"
BRIDGE_SPEC="megatron-bridge==0.3.1"
STAMP=.venv/.ar2dlm-installed
WANT="$(cat requirements/cpu.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x .venv/bin/ar2dlm ]; then
    exit 0
fi

echo "setup_env: creating .venv with $("$PYTHON" --version 2>&1) (this takes a few minutes once)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip>=23" "setuptools>=77" wheel
"${PIP[@]}" install "$TORCH_SPEC"
# The requirements (lm-eval among them) must not replace that torch: pip fails instead of upgrading it.
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/.ar2dlm-torch-constraint.txt
"${PIP[@]}" install -r requirements/cpu.txt -c .venv/.ar2dlm-torch-constraint.txt
"${PIP[@]}" install --no-deps "$BRIDGE_SPEC"
"${PIP[@]}" install --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, megatron.core, lm_eval, ar2dlm; print('setup_env: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| lm-eval', lm_eval.__version__, '| ar2dlm', ar2dlm.__version__)" >&2
echo "$WANT" > "$STAMP"
