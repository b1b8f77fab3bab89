#!/usr/bin/env bash
# The embedded-world comparison (Table 1 style): SFT, DPO, RLPA and its two reward ablations, all
# from the same SFT warm start, plus the untrained model, each evaluated with the ALOE protocol
# (Base prompting, cold start, 10 turns) on held-out synthetic users. CPU only.
#
#     make reproduce-tiny            # or: bash launch/reproduce_tiny.sh [output dir] [python]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/reproduce-tiny}
PY=${2:-.venv/bin/python}
USERS=${USERS:-32}
QUIET="logging.progress_bar=false"

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "untrained model (random init, no SFT, no PPO)"
$PY launch/train.py --fresh output_dir=$OUT name=base sft.enabled=false ppo.iterations=0 logging.export_hf=false $QUIET
step "SFT warm start on scripted teacher dialogues"
$PY launch/sft.py --fresh output_dir=$OUT name=sft $QUIET
SFT=$OUT/sft/sft
step "DPO from SFT (teacher turn preferred over the same turn with the user's values misread)"
$PY launch/dpo.py --fresh --init $SFT output_dir=$OUT name=dpo $QUIET
for variant in "rlpa ppo.reward=both" "rlpa-profile-only ppo.reward=profile" "rlpa-response-only ppo.reward=response"; do
  set -- $variant
  step "PPO from SFT: $1"
  $PY launch/train.py --fresh output_dir=$OUT name=$1 sft.enabled=false model.init_checkpoint=$SFT $2 logging.export_hf=false $QUIET
done

EVAL=$OUT/eval
compare=()
for run in base:$OUT/base/checkpoints sft:$SFT dpo:$OUT/dpo/dpo rlpa:$OUT/rlpa/checkpoints \
           rlpa-profile-only:$OUT/rlpa-profile-only/checkpoints rlpa-response-only:$OUT/rlpa-response-only/checkpoints; do
  name=${run%%:*}; path=${run#*:}
  step "evaluate $name"
  $PY launch/eval.py --policy $path --name $name --setting vanilla --users $USERS --turns 10 --output $EVAL \
      --no-progress ${compare[@]+--compare "${compare[@]}"}
  compare+=("$EVAL/${name}_vanilla.json")
done
echo; echo "table and figure: $EVAL (the last evaluation prints every run side by side)"
