#!/usr/bin/env bash
# The held-out evaluation of this folder: LCPO-Exact prompts, budgets 32 / 64 / 128 / 256, generation limit 2 x budget.
#   DIR/merged   arith test split, 100 problems x 4 samples: the untrained model and the run's step STEP
#   DIR/gsm8k    GSM8K test (never trained on), 100 problems x 2 samples: the same two models
#   DIR/s1       arith, 100 x 2: S1 budget forcing on the untrained model, beside the run's step STEP
# A part already written is kept (delete its directory to redo it). GSM8K is read from $LCPO_SHARED/data (default
# ../shared/data), the S1 part runs only with S1=1. TARGET=max evaluates with "at most" prompts (L1-Max), limit 512
# tokens, into parts named *-max; LABEL names the trained model (default LCPO-Exact-step-STEP).
#   bash results/lcpo-smollm2-cpu-logu/evaluate.sh RUN_DIR STEP [DIR]        (DIR defaults to RUN_DIR/eval)
set -euo pipefail
cd "$(dirname "$0")/../.."
run=$1 step=$(printf %06d "$2") dir=${3:-$1/eval} target=${TARGET:-exact}
model=$run/checkpoints/step_$step/model label=${LABEL:-LCPO-Exact-step-$2} base=SmolLM2-135M-Instruct
TR=(env OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2)
BUDGETS=(--budgets 32 64 128 256 --last-number-fallback --target "$target")
x=""  # the parts' suffix
if [ "$target" = max ]; then BUDGETS+=(--max-new-tokens 512); x=-max; fi
ARITH=(--data arith --limit 100 "${BUDGETS[@]}")
GSM8K=(--data "${LCPO_SHARED:-../shared}/data/gsm8k/test.jsonl" --limit 100 --samples 2 "${BUDGETS[@]}")
ev() { [ -f "$1/results.json" ] || "${TR[@]}" evaluate.py --out "$@"; }
merge() { .venv/bin/python evaluate.py --merge "${@:2}" --out "$1"; }

ev "$dir/base$x" --model smollm2 --labels "$base" "${ARITH[@]}" --samples 4
ev "$dir/step-$2$x" --model "$model" --labels "$label" "${ARITH[@]}" --samples 4
merge "$dir/merged$x" "$dir/base$x" "$dir/step-$2$x"
ev "$dir/gsm8k-base$x" --model smollm2 --labels "$base" "${GSM8K[@]}"
ev "$dir/gsm8k-step-$2$x" --model "$model" --labels "$label" "${GSM8K[@]}"
merge "$dir/gsm8k$x" "$dir/gsm8k-base$x" "$dir/gsm8k-step-$2$x"
if [ "${S1:-}" = 1 ]; then
  ev "$dir/base-s1" --model smollm2 --labels "$base" "${ARITH[@]}" --samples 2 --baseline budget-forcing --baseline-only
  merge "$dir/s1" "$dir/base-s1" "$dir/step-$2"  # the untrained model without forcing is in DIR/merged
fi
