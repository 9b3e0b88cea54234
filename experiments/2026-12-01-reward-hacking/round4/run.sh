#!/usr/bin/env bash
# Round 4 of issue #16: configs/toy.yaml's combination (round 2) plus the token-level unlikelihood term
# (trainer.unlikelihood_coef) on the tokens the fluency gate finds implausible (reference log-prob below
# reward.rules.fluency_min_logprob), and the implausible-mass penalty (trainer.implausible_mass_coef) on the same
# tokens. Round 2's combination runs (runs/reward_hacking/combo-s*) are the control.
#
#   SEEDS="1" NAMES="ul1 ul10" experiments/2026-12-01-reward-hacking/round4/run.sh
#
# Two invocations with different NAMES or SEEDS may run at once (each run has its own Ray temp dir). Finished
# runs (with eval.json) are skipped, an unfinished one resumes from its last checkpoint. Unlike run.sh this
# does not call `make venv` (it runs from a git worktree that shares /work/main's .venv: PYTHONPATH points
# the venv at this tree's saferl).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH="$PWD"
HERE=experiments/2026-12-01-reward-hacking/round4
OUT=${OUT:-runs/reward_hacking_round4}
SEEDS=${SEEDS:-"1 2 3"}
mkdir -p "$OUT"
declare -A SETTINGS=(
  [ul1]="trainer.unlikelihood_coef=1.0"
  [ul10]="trainer.unlikelihood_coef=10.0"
  # The implausible-mass penalty (trainer.implausible_mass_coef) on the same tokens.
  [mass02]="trainer.implausible_mass_coef=0.2"
  [mass1]="trainer.implausible_mass_coef=1.0"
  [mass005]="trainer.implausible_mass_coef=0.05"
  # The control on this tree's code: configs/toy.yaml as it is (both terms off), against round 2's combo-s*.
  [control]=""
)
NAMES=${NAMES:-"ul1 ul10"}
for seed in $SEEDS; do
  for name in $NAMES; do
    dir="$OUT/$name-s$seed"
    if [[ -f "$dir/eval.json" ]]; then echo "[round4] $dir done, skipped"; continue; fi
    echo "[round4] $dir ($(date -u +%H:%M:%S))"
    # shellcheck disable=SC2086  # the settings are several KEY=VALUE words
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
      TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled .venv/bin/python -m saferl.cli train -c configs/toy.yaml \
      ${SETTINGS[$name]} rollout.top_p=1.0 run.seed="$seed" run.dir="$dir" ray.temp_dir="/tmp/ray-r4-$name-s$seed" \
      logging.progress=false > "$OUT/$name-s$seed.log" 2>&1 || { echo "[round4] $dir failed, see $OUT/$name-s$seed.log"; exit 1; }
  done
done
[[ -n "${NO_REPORT:-}" ]] || .venv/bin/python -m saferl.cli report --table "$HERE/table.yaml" --runs "$OUT" \
  -o "$HERE/results.md"
