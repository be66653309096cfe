#!/usr/bin/env bash
# The held-out evaluation of this folder: the untrained model (and, with BASELINE=1, the same model under S1 budget
# forcing) and a checkpoint of the run, with LCPO-Exact prompts, on the arith test split: 100 problems x 4 samples
# per budget, generation limit 2 x budget. Both are merged into DIR/merged (table.md, results.json, plots).
#   bash results/lcpo-smollm2-cpu-logu/evaluate.sh RUN_DIR STEP [DIR]        (DIR defaults to RUN_DIR/eval)
set -euo pipefail
cd "$(dirname "$0")/../.."
run=$1 step=$(printf %06d "$2") dir=${3:-$1/eval}
EVAL="--data arith --limit 100 --samples 4 --budgets 32 64 128 256 --last-number-fallback --target exact"
TR=(env OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2)
[ -f "$dir/base/samples.jsonl" ] || "${TR[@]}" evaluate.py --model smollm2 --labels SmolLM2-135M-Instruct $EVAL \
  ${BASELINE:+--baseline budget-forcing} --out "$dir/base"
"${TR[@]}" evaluate.py --model "$run/checkpoints/step_$step/model" --labels "LCPO-Exact-step-$2" $EVAL \
  --out "$dir/step-$2"
.venv/bin/python evaluate.py --merge "$dir/base" "$dir/step-$2" --out "$dir/merged"
