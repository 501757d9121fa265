#!/usr/bin/env bash
# Single node, N processes: launch/torchrun.sh N <stage> [key=value ...]
# Hydra overrides are forwarded untouched, e.g.
#   launch/torchrun.sh 8 train recipe=qwen3_8b_joint init=/ckpt/converted output=/runs/joint parallel.tensor=2
# Uses NCCL on GPUs and gloo on CPUs (chosen by ar2dlm). Set PYTHON to pick the interpreter.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NPROC STAGE [key=value ...]" >&2
    exit 2
fi
NPROC="$1"
shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m ar2dlm.cli "$@"
