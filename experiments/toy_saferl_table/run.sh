#!/usr/bin/env bash
# The toy SafeRL table: the fine-tuned (SFT) toy policy against GSPO with a guard-only reward and with the
# hybrid reward, 3 training seeds each, under the GSPO paper's setting (no KL penalty); plus both rewards with
# a k3 KL penalty of 0.1 to the SFT policy (the reward-hacking mitigation). Every run evaluates before and
# after training on the same held-out set with the same evaluation seed (configs/toy.yaml: eval.seed=1234), so
# "before" is the SFT baseline.
#
#   experiments/toy_saferl_table/run.sh            # all 12 runs (~5 min each on 2 CPU cores), then the table
#   SEEDS="1" experiments/toy_saferl_table/run.sh  # fewer seeds
#
# Finished runs (with eval.json) are skipped, so the command can be re-run after an interruption; an
# unfinished run resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
make venv >/dev/null
OUT=${OUT:-runs/toy_saferl_table}
SEEDS=${SEEDS:-"1 2 3"}
mkdir -p "$OUT"
# Shared by every setting: lr 2e-4 (configs/toy.yaml has 1e-4, under which 40 steps were too few for the
# hybrid reward to reach 90% safety: 0.87 at seed 1; see README.md).
COMMON="trainer.lr=2e-4"
declare -A SETTINGS=(
  [hybrid]="reward.recipe=hybrid trainer.kl_coef=0"
  [guard_only]="reward.recipe=guard_only trainer.kl_coef=0"
  [hybrid_kl]="reward.recipe=hybrid trainer.kl_coef=0.1"
  [guard_only_kl]="reward.recipe=guard_only trainer.kl_coef=0.1"
)
NAMES=${NAMES:-"hybrid guard_only hybrid_kl guard_only_kl"}
for seed in $SEEDS; do
  for name in $NAMES; do
    dir="$OUT/$name-s$seed"
    if [[ -f "$dir/eval.json" ]]; then echo "[table] $dir done, skipped"; continue; fi
    echo "[table] $dir"
    # shellcheck disable=SC2086  # the settings are several KEY=VALUE words
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 WANDB_MODE=disabled .venv/bin/python -m saferl.cli train \
      -c configs/toy.yaml $COMMON ${SETTINGS[$name]} run.seed="$seed" run.dir="$dir" logging.progress=false \
      > "$OUT/$name-s$seed.log" 2>&1 || { echo "[table] $dir failed, see $OUT/$name-s$seed.log"; exit 1; }
  done
done
.venv/bin/python -m saferl.cli report --table experiments/toy_saferl_table/table.yaml --runs "$OUT" \
  -o experiments/toy_saferl_table/results.md
# What the answers really are (toy ground truth, degenerate refusals split off): ~25 s per run.
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python experiments/toy_saferl_table/answers.py --runs "$OUT" \
  > experiments/toy_saferl_table/answers.md
