#!/usr/bin/env bash
# GPU smoke test: one script, one GPU, under 9 minutes (hard time budget), nothing installed or downloaded.
#
#   launch/gpu_smoke.sh            # needs a CUDA build of torch, Transformer Engine, and the dev extra (pytest)
#
# 1. `pytest -m gpu` (the suite's GPU-marked tests);
# 2. a ~100M-parameter Llama (ar2dlm.model.hf_factory) with a tokenizer trained on the demo corpus
#    (ar2dlm.data.synthetic, written to JSONL), converted with `ar2dlm convert`;
# 3. 30 steps of joint AR + diffusion training with the Transformer Engine layers in bf16, then the same in
#    FP8 (train.fp8=hybrid train.fp8_recipe=delayed); both loss curves and tokens/s are printed;
# 4. `ar2dlm export` of the bf16 run and `ar2dlm generate` in the three decoding modes;
# 5. 10 steps of the drafter LoRA (train.objective=drafter, bf16) from the bf16 run, its export, and
#    `ar2dlm generate` in self-speculation with the drafter.
# A summary goes to $OUT/gpu_smoke_summary.txt when OUT is set, else ./gpu_smoke_summary.txt.
# Exit status: 0 when every step passed, 1 when one failed, 2 when there is no CUDA GPU / Transformer Engine.
#
# Environment: PYTHON (default .venv/bin/python, else python3), WORK (scratch folder, default a new temp
# folder), STEPS (default 30), BUDGET_S (whole-script time budget in seconds, default 510).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3 || echo python3)"

if ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "gpu_smoke.sh: no CUDA GPU: torch.cuda.is_available() is False for $PYTHON" \
         "(a CUDA build of torch and a visible GPU are needed); nothing was run" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
    echo "gpu_smoke.sh: Transformer Engine is not importable by $PYTHON (install the gpu extra:" \
         "pip install -e '.[gpu,dev]'); nothing was run" >&2
    exit 2
fi

STEPS="${STEPS:-30}"
BUDGET_S="${BUDGET_S:-510}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/ar2dlm-gpu-smoke.XXXXXX")}"
mkdir -p "$WORK"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    SUMMARY="$OUT/gpu_smoke_summary.txt"
else
    SUMMARY="$PWD/gpu_smoke_summary.txt"
fi
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
AR2DLM=("$PYTHON" -m ar2dlm.cli)
FAILED=0
START=$SECONDS

say() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME CAP_S COMMAND...: run one step under min(CAP_S, time left), log it to $WORK/NAME.log, record the result
run() {
    local name="$1" cap="$2" left status began
    shift 2
    left=$((BUDGET_S - (SECONDS - START)))
    [ "$cap" -lt "$left" ] || cap="$left"
    if [ "$cap" -lt 10 ]; then
        say "SKIP  $name (time budget of ${BUDGET_S}s spent)"
        FAILED=1
        return 1
    fi
    began=$SECONDS
    echo "--- $name: $*" >&2
    timeout --signal=TERM --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
    status=$?
    if [ "$status" = 0 ]; then
        say "PASS  $name ($((SECONDS - began))s)"
    else
        [ "$status" != 124 ] || say "      $name timed out after ${cap}s"
        say "FAIL  $name (exit $status, $((SECONDS - began))s; log: $WORK/$name.log)"
        tail -n 25 "$WORK/$name.log" | sed 's/^/      | /' | tee -a "$SUMMARY"
        FAILED=1
    fi
    return "$status"
}

say "ar2dlm GPU smoke test, $(date '+%F %T')"
say "$("$PYTHON" - <<'EOF'
import torch
import transformer_engine
print(f"GPU {torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, Transformer Engine {transformer_engine.__version__}")
EOF
)"
say "work folder: $WORK"
say ""

# 1. the GPU-marked tests
run pytest_gpu 240 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
grep -E "passed|failed|error|skipped" "$WORK/pytest_gpu.log" | tail -n 1 | sed 's/^/      /' | tee -a "$SUMMARY"

# 2. a ~100M-parameter Llama and the demo corpus
run make_model 90 "$PYTHON" - "$WORK" <<'EOF'
import math
import sys
from pathlib import Path

from safetensors import safe_open

from ar2dlm.data.synthetic import examples, write_jsonl
from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

work = Path(sys.argv[1])
corpus = list(examples(20000, seed=0))
write_jsonl(work / "corpus.jsonl", corpus)
tokenizer = train_tokenizer([e.text for e in corpus[:5000]], vocab_size=400, extra_special_tokens=["<|fim_pad|>"])
path = make_hf_model("LlamaForCausalLM", work / "source", vocab_size=512, hidden_size=768, num_layers=12,
                     num_attention_heads=12, num_key_value_heads=4, intermediate_size=3072,
                     tokenizer=tokenizer, max_position_embeddings=2048)
count = 0
for file in path.glob("*.safetensors"):
    with safe_open(file, "pt") as handle:
        count += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
print(f"model: {count / 1e6:.1f}M parameters, tokenizer {len(tokenizer)} tokens, corpus {len(corpus)} lines")
EOF
tail -n 1 "$WORK/make_model.log" | sed 's/^/      /' | tee -a "$SUMMARY"
run convert 120 "${AR2DLM[@]}" convert source="$WORK/source" output="$WORK/converted" overwrite=true

# 3. joint training, bf16 then FP8
TRAIN=(train init="$WORK/converted" "data.sources=[{path: $WORK/corpus.jsonl}]" data.seq_length=512
       diffusion.block_size=32 diffusion.noise_schedule=position train.objective=joint train.steps="$STEPS"
       train.global_batch_size=32 train.micro_batch_size=8 train.precision=bf16 optim.lr=1e-3 optim.min_lr=1e-4
       optim.warmup_steps=3 optim.decay_fraction=0.2 checkpoint.save_interval=0 seed=1234)
run train_bf16 150 "${AR2DLM[@]}" "${TRAIN[@]}" output="$WORK/run_bf16"
if "$PYTHON" -c 'import sys, torch; sys.exit(torch.cuda.get_device_capability() < (8, 9))' 2>/dev/null; then
    run train_fp8 150 "${AR2DLM[@]}" "${TRAIN[@]}" output="$WORK/run_fp8" train.fp8=hybrid train.fp8_recipe=delayed
else
    say "SKIP  train_fp8 (FP8 needs compute capability 8.9 or newer: Ada, Hopper, Blackwell)"
fi

"$PYTHON" - "$WORK" <<'EOF' | tee -a "$SUMMARY"
import json
import sys
from pathlib import Path

work = Path(sys.argv[1])
runs = {}
for name in ("bf16", "fp8"):
    metrics = work / f"run_{name}" / "metrics.jsonl"
    runs[name] = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
print("")
print("loss curves (total | AR | diffusion):")
print(f"{'step':>5}  {'bf16':>26}  {'fp8 (hybrid, delayed)':>26}")
steps = sorted({r["step"] for rows in runs.values() for r in rows})
by_step = {name: {r["step"]: r for r in rows} for name, rows in runs.items()}
for step in steps:
    cells = []
    for name in ("bf16", "fp8"):
        r = by_step[name].get(step)
        cells.append(f"{r['loss']:8.4f} {r['ar_loss']:8.4f} {r['dlm_loss']:8.4f}" if r else f"{'-':>26}")
    print(f"{step:>5}  {cells[0]:>26}  {cells[1]:>26}")
print("")
for name, rows in runs.items():
    steady = rows[5:] or rows  # the first steps include compilation and warm-up
    if steady:
        rate = sum(r["tokens_per_s"] for r in steady) / len(steady)
        print(f"{name}: {rate:,.0f} tokens/s (mean of steps {steady[0]['step']}-{steady[-1]['step']}), "
              f"loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
    else:
        print(f"{name}: no metrics")
print("")
EOF

# 4. export the bf16 run, decode in every mode
CHECKPOINT="$(ls -d "$WORK"/run_bf16/checkpoints/step_* 2>/dev/null | sort | tail -n 1)"
run export 120 "${AR2DLM[@]}" export checkpoint="${CHECKPOINT:-$WORK/run_bf16/checkpoints/missing}" \
    output="$WORK/exported" overwrite=true
for mode in ar diffusion self_spec; do
    if run "generate_$mode" 60 "${AR2DLM[@]}" generate model="$WORK/exported" mode="$mode" \
        "prompt='copy: a b 3 c 7 d ='" max_new_tokens=32 block_length=32 threshold=0.9 device=cuda; then
        tail -n 2 "$WORK/generate_$mode.log" | sed 's/^/      /' | tee -a "$SUMMARY"
    fi
done

# 5. the drafter LoRA from the bf16 run, exported, drafting in self-speculation
if run train_drafter 120 "${AR2DLM[@]}" train init="${CHECKPOINT:-$WORK/run_bf16/checkpoints/missing}" \
    "data.sources=[{path: $WORK/corpus.jsonl}]" data.seq_length=512 diffusion.block_size=32 \
    train.objective=drafter train.steps=10 train.global_batch_size=32 train.micro_batch_size=8 \
    train.precision=bf16 drafter.rank=16 drafter.alpha=32 optim.lr=1e-3 optim.warmup_steps=0 \
    checkpoint.save_interval=0 seed=1234 output="$WORK/run_drafter"; then
    grep -E "train \(drafter\): 10/10" "$WORK/train_drafter.log" | tail -n 1 | sed 's/^/      /' | tee -a "$SUMMARY"
    DRAFTER="$(ls -d "$WORK"/run_drafter/checkpoints/step_* 2>/dev/null | sort | tail -n 1)"
    run export_drafter 120 "${AR2DLM[@]}" export checkpoint="${DRAFTER:-$WORK/run_drafter/checkpoints/missing}" \
        output="$WORK/exported_drafter" overwrite=true &&
    run generate_self_spec_drafter 60 "${AR2DLM[@]}" generate model="$WORK/exported_drafter" mode=self_spec \
        "prompt='copy: a b 3 c 7 d ='" max_new_tokens=32 block_length=32 device=cuda &&
    tail -n 2 "$WORK/generate_self_spec_drafter.log" | sed 's/^/      /' | tee -a "$SUMMARY"
fi

say ""
if [ "$FAILED" = 0 ]; then
    say "gpu smoke test PASSED in $((SECONDS - START))s"
else
    say "gpu smoke test FAILED in $((SECONDS - START))s (see above; logs in $WORK)"
fi
echo "summary: $SUMMARY" >&2
exit "$FAILED"
