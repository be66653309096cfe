#!/usr/bin/env bash
# LoRA against full fine-tuning, learning: the CPU LCPO recipe (--preset smollm2-lcpo-cpu-logu, results/) for STEPS
# steps with the same seed, full fine-tuning at the recipe's learning rate (2e-5) and LoRA r 32 at 3x, 10x and 30x
# of it; each run's last checkpoint evaluated on held-out arith (100 problems x 4 samples at 32 / 64 / 128 / 256
# tokens asked), then one table of accuracy, deviation and repetition for all four (KEEP/merged/table.md; KEEP
# defaults to results/lora-vs-full-smollm2-cpu).
# A step takes 95-150 s on a 2-core Intel Xeon with AMX (full fine-tuning: an arm of 45 steps in 75-95 min) and
# 280-300 s for the first steps on a 2-core AMD EPYC with AVX512-BF16 (LoRA r 32; the responses shorten as it
# trains), so it runs in parts: run it again and each run continues (--resume).
# A finished arm's evaluation, config and metrics are copied to KEEP (in the repo), and an arm found there is not run
# again: the comparison survives losing RUNS. ARM names run only those arms (full, lora-r32-3x, -10x, -30x).
#   bash bench/lora_learning.sh [RUNS] [STEPS] [ARM ...]   (defaults ~/lcpo-runs/lora-vs-full, 45, all four)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-$HOME/lcpo-runs/lora-vs-full} steps=${2:-45}
shift $(($# < 2 ? $# : 2))
keep=${KEEP:-results/lora-vs-full-smollm2-cpu}
TR=(env OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 --shutdown-timeout 600)
EVAL=(--data arith --limit 100 --samples 4 --budgets 32 64 128 256 --last-number-fallback --target exact)
variants=("full:" "lora-r32-3x:--lora-rank 32 --lr 6e-5" "lora-r32-10x:--lora-rank 32 --lr 2e-4"
  "lora-r32-30x:--lora-rank 32 --lr 6e-4")
for v in "${variants[@]}"; do
  name=${v%%:*} flags=${v#*:} out=$runs/${v%%:*}
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  if [ -f "$keep/$name/eval/results.json" ]; then echo "$name: kept in $keep/$name"; continue; fi
  resume=$([ -d "$out/checkpoints" ] && echo --resume || true)
  # shellcheck disable=SC2086  # the flags split into words
  "${TR[@]}" grpo.py --preset smollm2-lcpo-cpu-logu --steps "$steps" --out "$out" $flags $resume
  last=$out/checkpoints/step_$(printf %06d "$steps")/model  # LoRA runs merge their model at the last save
  [ -f "$out/eval/results.json" ] ||
    "${TR[@]}" evaluate.py --model "$last" --labels "$name" "${EVAL[@]}" --out "$out/eval"
  mkdir -p "$keep/$name/eval"
  cp "$out"/config.json "$out"/metrics.jsonl "$keep/$name/"
  cp "$out"/eval/{results.json,table.md,*.png} "$keep/$name/eval/"
  gzip -c "$out/eval/samples.jsonl" >"$keep/$name/eval/samples.jsonl.gz"
done
evals=() labels=()
for v in "${variants[@]}"; do
  name=${v%%:*}
  [ -f "$keep/$name/eval/results.json" ] && evals+=("$keep/$name/eval") && labels+=("$name")
done
if [ ${#evals[@]} -gt 1 ]; then .venv/bin/python evaluate.py --merge "${evals[@]}" --out "$keep/merged"; fi
echo "kept: ${labels[*]}"
