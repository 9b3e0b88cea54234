#!/usr/bin/env bash
# Round 5: ../run.sh's rows with nucleus sampling at top-p 0.9 in training rollouts and the held-out evaluation
# alike, into runs/reward_hacking_round5, reported from round5/table.yaml:
#
#   SEEDS="1 2 3" NAMES="combo guard_only" experiments/2026-12-01-reward-hacking/round5/run.sh
set -euo pipefail
here="$(dirname "$0")"
OUT=${OUT:-runs/reward_hacking_round5} HERE=experiments/2026-12-01-reward-hacking/round5 \
  SAMPLING=${SAMPLING:-rollout.top_p=0.9} exec "$here/../run.sh" "$@"
