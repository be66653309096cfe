#!/usr/bin/env bash
# The length-reward comparison: every reward of rewards.REWARDS trained for the same steps from the same start
# (the embedded SmolLM2-135M-Instruct) on the same data (the built-in arith task, seed 0), then evaluated on
# held-out arith problems by evaluate.py. CPU-sized: 2 processes of 1 thread (make train's layout), vLLM rollouts.
#   bash results/reward-comparison-smollm2-cpu/run.sh [STEPS]      # from the repo root, after make setup
# Writes runs/compare/<reward>/ (training) and runs/compare/eval-*/ (evaluation), then this folder's
# table.md, comparison.json and accuracy_vs_tokens.png (results/reward-comparison-smollm2-cpu/summarize.py).
set -euo pipefail
STEPS=${1:-20}
OUT=runs/compare
RUN="OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2"
# The CPU LCPO recipe (config.py preset smollm2-lcpo-cpu: 4 problems x 8 responses per step, up to 192 new tokens,
# lr 2e-5, no KL), with the GPU run's grading (--last-number-fallback): the same for every reward.
COMMON="--preset smollm2-lcpo-cpu --last-number-fallback --steps $STEPS --save-every $STEPS --keep-checkpoints 1"
mkdir -p $OUT
for reward in lcpo-exact lcpo-max correctness dapo laser thinkprune cosine kimi efficient shorterbetter grpo-lead \
              alp hapo; do
  case $reward in lcpo-exact) target=exact ;; lcpo-max) target=max ;; *) target=none ;; esac
  if [ ! -f $OUT/$reward/checkpoints/step_$(printf %06d $STEPS)/state.json ]; then
    rm -rf $OUT/$reward
    start=$(date +%s)
    eval $RUN grpo.py $COMMON --reward $reward --target $target --out $OUT/$reward > $OUT/$reward.log 2>&1
    echo "$reward $(( $(date +%s) - start ))" >> $OUT/train_seconds.txt
  fi
done
ckpt() { echo $OUT/$1/checkpoints/step_$(printf %06d $STEPS)/model; }
EVAL="--data arith --limit 24 --samples 4 --budgets 32 64 96 128 --last-number-fallback --engine vllm"
# Each prompt as it was trained: exact and max with their sentence, the others without one (--target none).
eval $RUN evaluate.py --model smollm2 $(ckpt lcpo-exact) --labels base lcpo-exact $EVAL --target exact \
  --out $OUT/eval-exact > $OUT/eval-exact.log 2>&1
eval $RUN evaluate.py --model smollm2 $(ckpt lcpo-max) --labels base lcpo-max $EVAL --target max \
  --max-new-tokens 256 --out $OUT/eval-max > $OUT/eval-max.log 2>&1
NONE="correctness dapo laser thinkprune cosine kimi efficient shorterbetter grpo-lead alp hapo"
# With no target in the prompt the budget changes nothing but the measure: one budget, twice the samples.
eval $RUN evaluate.py --model smollm2 $(for r in $NONE; do ckpt $r; done) --labels base $NONE $EVAL --target none \
  --budgets 128 --samples 8 --max-new-tokens 256 --out $OUT/eval-none > $OUT/eval-none.log 2>&1
.venv/bin/python results/reward-comparison-smollm2-cpu/summarize.py $OUT --steps $STEPS
