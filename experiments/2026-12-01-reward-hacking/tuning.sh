#!/usr/bin/env bash
# The seed-1 sweep that chose round 2's configs/toy.yaml (lr and entropy penalty), then tuning.md. Each run is
# configs/toy.yaml with round 1's alarm (it only warns: training is the same with any alarm) and the lr and
# entropy weight of its row. Ran on 2026-12-01 from commits 7900fd4..3b4716b, two runs at a time (~11 min each).
#
#   experiments/2026-12-01-reward-hacking/tuning.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
make venv >/dev/null
HERE=experiments/2026-12-01-reward-hacking
OUT=${OUT:-runs/reward_hacking_tuning}
ROUND1_ALARM="monitor.alarm.metric=monitor/ref_logprob_drop monitor.alarm.threshold=0.035"
declare -A SETTINGS=(
  [lr1e4]="trainer.lr=1e-4 trainer.entropy_coef=0"
  [lr5e5]="trainer.lr=5e-5 trainer.entropy_coef=0"
  [ent05]="trainer.lr=1e-4 trainer.entropy_coef=-0.05"
  [ent20]="trainer.lr=1e-4 trainer.entropy_coef=-0.2"
  [ent50]="trainer.lr=1e-4 trainer.entropy_coef=-0.5"
  [ent100]="trainer.lr=1e-4 trainer.entropy_coef=-1.0"
)
mkdir -p "$OUT"
for name in lr1e4 lr5e5 ent05 ent20 ent50 ent100; do
  dir="$OUT/$name-s1"
  if [[ -f "$dir/eval.json" ]]; then echo "[tuning] $dir done, skipped"; continue; fi
  echo "[tuning] $dir ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086  # the settings are several KEY=VALUE words
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
    WANDB_MODE=disabled .venv/bin/python -m saferl.cli train -c configs/toy.yaml ${SETTINGS[$name]} $ROUND1_ALARM rollout.top_p=1.0 \
    run.seed=1 run.dir="$dir" ray.temp_dir="/tmp/ray-$name-s1" logging.progress=false \
    > "$OUT/$name-s1.log" 2>&1 || { echo "[tuning] $dir failed, see $OUT/$name-s1.log"; exit 1; }
done
.venv/bin/python -m saferl.cli report --table "$HERE/tuning.yaml" --runs "$OUT" -o "$HERE/tuning.md"
