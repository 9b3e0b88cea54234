#!/usr/bin/env bash
# The toy SafeRL table judged three ways (reward guard, independent judge, ground truth), issue #16: the SFT
# policy, guard-only, the unmitigated hybrid reward, the hybrid reward with each reward-hacking mitigation alone
# (KL to the SFT policy, a conservative RM ensemble, the fluency gate, the entropy penalty) and with the chosen
# combination, which is configs/toy.yaml's default. Every run has the independent judge (eval.judge) and the
# monitor with its alarm (action warn), as configs/toy.yaml sets them, so the unmitigated rows give the alarm's
# lead time.
#
#   experiments/2026-12-01-reward-hacking/run.sh                 # every row x seeds 1 2 3 (~6 min a run)
#   SEEDS="1" NAMES="hybrid combo" experiments/2026-12-01-reward-hacking/run.sh
#
# Two invocations with different NAMES or SEEDS may run at once (each run has its own Ray temp dir).
#
# Finished runs (with eval.json) are skipped, an unfinished one resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
make venv >/dev/null
HERE=${HERE:-experiments/2026-12-01-reward-hacking}
OUT=${OUT:-runs/reward_hacking}
# Round 2 sampled at top-p 1.0; configs/toy.yaml now sets 0.9 (round 5 passes SAMPLING=rollout.top_p=0.9).
SAMPLING=${SAMPLING:-rollout.top_p=1.0}
SEEDS=${SEEDS:-"1 2 3"}
mkdir -p "$OUT"
# Every mitigation off: the rows below switch on what they measure. A mitigation alone keeps configs/toy.yaml's
# value of it (hybrid_entropy: its entropy penalty; hybrid_gate: its gate and cap).
KL=trainer.kl_coef=0 ENT=trainer.entropy_coef=0 ENS=helpfulness.ensemble=[] GATE=reward.rules.fluency_min_logprob=null
OFF="$KL $ENT $ENS $GATE"
ENSEMBLE="helpfulness.ensemble=[toyworld:reward_model_1,toyworld:reward_model_2] reward.rules.ensemble=min"
declare -A SETTINGS=(
  [guard_only]="reward.recipe=guard_only $OFF"
  [hybrid]="reward.recipe=hybrid $OFF"
  [hybrid_kl]="reward.recipe=hybrid $OFF trainer.kl_coef=0.1"
  [hybrid_ensemble]="reward.recipe=hybrid $OFF $ENSEMBLE"
  [hybrid_gate]="reward.recipe=hybrid $KL $ENT $ENS"
  [hybrid_entropy]="reward.recipe=hybrid $KL $ENS $GATE"
  [combo]=""  # configs/toy.yaml as it is
  [combo_kl]="trainer.kl_coef=0.1"
)
NAMES=${NAMES:-"hybrid combo guard_only hybrid_kl hybrid_ensemble hybrid_gate hybrid_entropy combo_kl"}
for seed in $SEEDS; do
  for name in $NAMES; do
    dir="$OUT/$name-s$seed"
    if [[ -f "$dir/eval.json" ]]; then echo "[table] $dir done, skipped"; continue; fi
    echo "[table] $dir ($(date -u +%H:%M:%S))"
    # shellcheck disable=SC2086  # the settings are several KEY=VALUE words
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
      WANDB_MODE=disabled .venv/bin/python -m saferl.cli train -c configs/toy.yaml ${SETTINGS[$name]} $SAMPLING \
      run.seed="$seed" run.dir="$dir" ray.temp_dir="/tmp/ray-$name-s$seed" logging.progress=false \
      > "$OUT/$name-s$seed.log" 2>&1 || { echo "[table] $dir failed, see $OUT/$name-s$seed.log"; exit 1; }
  done
done
[[ -n "${NO_REPORT:-}" ]] || .venv/bin/python -m saferl.cli report --table "$HERE/table.yaml" --runs "$OUT" \
  -o "$HERE/results.md"
