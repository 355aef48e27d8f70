#!/usr/bin/env bash
# The qwen15 accuracy study's second round (studies/accuracy/README.md) on one GPU, after qwen15_device.sh's stage /
# install calls left the model in /tmp/q15, the wheels in /tmp/site and the data in /tmp/data and /tmp/sc, and
# bitsandbytes was installed into /tmp/site. Two sweeps run detached into one folder, so that runs outlive the
# calls and the GPU is not half idle while configs are tuned (done runs are skipped, so a call resumes):
#   A  tests the coupled configs at their tuned lr (seeds 2, 3 decide the target), then tunes the
#      equal-memory config (2 runs) and tests it at its tuned lr;
#   B  meanwhile tests the configs that need no tuning: 8 bytes per number, then the NF4 merge runs.
# The slots (~12 GiB each, studies.py; 11 on an H200, 6 on an H100) are split: A 6 on an H200 (the two
# equal-memory tune runs of 3 slots at once), 4 on an H100 (two coupled runs at once); B the rest.
#   R2_BUDGET=<s> bash studies/device/qwen15_round2.sh start   starts both (budget: s from now), waits <= R2_WAIT s
#   R2_SOLO_BUDGET=<s> bash studies/device/qwen15_round2.sh solo   the 1.5B scoring time alone (scoring_qwen15/)
#   bash studies/device/qwen15_round2.sh wait                  waits again (R2_WAIT, default 540 s)
#   (R2_A: sweep A's slots; R2_FLAGS: more sweep.py flags, e.g. --dry_run to check the two run lists)
# Each call returns the folder as $OUT/results.tgz (accuracy_qwen15/): unpack into studies/accuracy/results/qwen15.
set -uo pipefail
DIR=/tmp/accuracy_qwen15
FINAL=${OUT:-outputs/device}
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} SPRUNE_TRAINER_CACHE=/tmp/sc PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$FINAL"

sweep() {  # phase, --only regex, slots, budget s (from now); more sweep.py flags after
  local phase=$1 only=$2 slots=$3 budget=$4
  shift 4
  python studies/accuracy/sweep.py --study qwen15 --phase "$phase" --only "$only" --parallel "$slots" --out "$DIR" \
    --model_name_or_path /tmp/q15 --data_dir /tmp/data/commonsense --time_budget_s "$budget" \
    --deadline_s $((budget + 60)) ${R2_FLAGS:-} "$@"
}
left() { echo $(( $(cat /tmp/r2.end) - $(date +%s) )); }
running() { local f; for f in /tmp/r2.a.pid /tmp/r2.b.pid /tmp/r2.s.pid; do [ -f $f ] && kill -0 "$(cat $f)" 2>/dev/null && return 0; done; return 1; }

case ${1:-wait} in
  start)
    [ -f /tmp/q15/model.safetensors ] || { echo "no /tmp/q15: run qwen15_device.sh stage / install first" >&2; exit 1; }
    mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    slots=$(( mem > 100000 ? 11 : 6 )) a=${R2_A:-$(( mem > 100000 ? 6 : 4 ))}
    mkdir -p "$DIR" && cp -rn studies/accuracy/results/qwen15/. "$DIR"/
    echo $(( $(date +%s) + ${R2_BUDGET:?seconds} )) > /tmp/r2.end
    b=$R2_BUDGET
    setsid nohup bash -c "$(declare -f sweep left); DIR=$DIR; sweep test coupled $a $b; sweep tune _eqmem $a \$(left); sweep test _eqmem $a \$(left)" \
      > /tmp/r2.a.log 2>&1 < /dev/null & echo $! > /tmp/r2.a.pid
    setsid nohup bash -c "$(declare -f sweep); DIR=$DIR; sweep test '_8byte|_nf4|qlora' $((slots - a)) $b" \
      > /tmp/r2.b.log 2>&1 < /dev/null & echo $! > /tmp/r2.b.pid
    echo "started: $slots slots (A $a, B $((slots - a))), budget $b s" ;;
  solo)  # the scoring-time target (studies/scoring_cost/README.md): taylor / zeroth_order rows alone on the GPU
    setsid nohup bash -c "$(declare -f sweep); DIR=/tmp/scoring_qwen15; sweep solo 'sparse_(taylor|zeroth_order)_per_layer_rows' 1 ${R2_SOLO_BUDGET:-400}" \
      > /tmp/r2.s.log 2>&1 < /dev/null & echo $! > /tmp/r2.s.pid ;;
  wait) ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
t0=$SECONDS
while running && [ $((SECONDS - t0)) -lt "${R2_WAIT:-540}" ]; do sleep 5; done
running && echo "still running ($(left 2>/dev/null) s of budget left): call wait again" || echo "the sweeps have ended"
for f in /tmp/r2.a.log /tmp/r2.b.log /tmp/r2.s.log; do [ -f $f ] || continue; echo "--- $f"; grep -E "done|fail|killed|not launched|tuned lr|Error" "$f" | tail -12; done
tar czf "$FINAL/results.tgz" -C /tmp $(cd /tmp && ls -d accuracy_qwen15 scoring_qwen15 2>/dev/null) && ls -la "$FINAL"
