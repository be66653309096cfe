#!/usr/bin/env bash
# LoRA against full fine-tuning, learning: the CPU LCPO recipe (--preset smollm2-lcpo-cpu-logu, results/) for STEPS
# steps with the same seed, full fine-tuning at the recipe's learning rate (2e-5) and LoRA r 32 at 3x, 10x and 30x
# of it; each run's last checkpoint evaluated on held-out arith (100 problems x 4 samples at 32 / 64 / 128 / 256
# tokens asked), then one table of accuracy, deviation and repetition for all four (RUNS/merged/table.md).
# About STEPS x 100 s per run on 2 CPU cores, so it runs in parts: run it again and each run continues (--resume)
# and each finished evaluation is kept.
#   bash bench/lora_learning.sh [RUNS] [STEPS]          (defaults ~/lcpo-runs/lora-vs-full, 45)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-$HOME/lcpo-runs/lora-vs-full} steps=${2:-45}
TR=(env OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2)
EVAL=(--data arith --limit 100 --samples 4 --budgets 32 64 128 256 --last-number-fallback --target exact)
variants=("full:" "lora-r32-3x:--lora-rank 32 --lr 6e-5" "lora-r32-10x:--lora-rank 32 --lr 2e-4"
  "lora-r32-30x:--lora-rank 32 --lr 6e-4")
for v in "${variants[@]}"; do
  name=${v%%:*} flags=${v#*:} out=$runs/${v%%:*}
  resume=$([ -d "$out/checkpoints" ] && echo --resume || true)
  # shellcheck disable=SC2086  # the flags split into words
  "${TR[@]}" grpo.py --preset smollm2-lcpo-cpu-logu --steps "$steps" --out "$out" $flags $resume
  last=$out/checkpoints/step_$(printf %06d "$steps")/model  # LoRA runs merge their model at the last save
  [ -f "$out/eval/results.json" ] ||
    "${TR[@]}" evaluate.py --model "$last" --labels "$name" "${EVAL[@]}" --out "$out/eval"
done
.venv/bin/python evaluate.py --merge "$runs"/{full,lora-r32-3x,lora-r32-10x,lora-r32-30x}/eval --out "$runs/merged"
