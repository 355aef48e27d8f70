#!/usr/bin/env bash
# Issue 5 evidence on one host with 2 GPUs (device kind nvidia-h200-x2), all runs in sequence in < ~9 minutes:
#   single GPU (python) | DDP (torchrun) | ZeRO-2, ZeRO-3+offload (torchrun --deepspeed ds_configs/*.json) |
#   ZeRO-3 (accelerate launch, ds_configs/accelerate/zero3_1node.yaml) | simulated 2 nodes x 1 GPU (two accelerate
#   launchers, --machine_rank 0/1, 127.0.0.1): train N steps with a checkpoint at N/2, resume in a second pair of
#   launches, compare final adapters | merge_sparse check on a fresh base.
# Same seeded weights (saved once), same data, same global batch (16 = 8 per GPU x 2 GPUs, or 8 x GA 2 on one GPU),
# so loss curves are comparable step by step and tok/s compares equal micro-batches per GPU.
#
# Device command (wheels: ../shared/tools/gpu_wheels.sh, carry .whl):
#   <install prefix printed by gpu_wheels.sh> bash studies/multigpu/run_h200x2.sh
# Results in $OUT (default runs/multigpu): results.json (every run), summary.md, logs.tar.gz.
# Re-run a subset: ONLY="zero2 merge_check" bash studies/multigpu/run_h200x2.sh (reuses $WORK/model).
# Knobs (env): STEPS=60 STEPS2=20 SEQ=1024 MB=8 GB=16 LR=3e-3 BUDGET=540 (seconds; runs that would not fit are skipped).
set -uo pipefail
T0=$SECONDS
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-$REPO/runs/multigpu}
WORK=${WORK:-/tmp/sprune_multigpu}
BUDGET=${BUDGET:-540}
STEPS=${STEPS:-60} SEQ=${SEQ:-1024} MB=${MB:-8} GB=${GB:-16} LR=${LR:-3e-3}
STEPS2=${STEPS2:-20}  # the save -> resume run: checkpoint at STEPS2/2
HALF=$((STEPS2 / 2))
ONLY=${ONLY:-}
EXTRA=${EXTRA:-}  # e.g. EXTRA=--tiny for a CPU dry run
PY=${PY:-python3}
S=studies/multigpu/train_scale.py
mkdir -p "$OUT" "$WORK/runs" "$WORK/logs"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
COMMON=(--model_dir "$WORK/model" --seq_len "$SEQ" --per_device_batch "$MB" --global_batch "$GB" --lr "$LR" $EXTRA)
STATUS=$WORK/status.tsv
: > "$STATUS"

want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
left() { echo $((BUDGET - (SECONDS - T0))); }

collect() {  # after every run, so a cut-off session still returns everything finished so far
  $PY studies/multigpu/compare.py --collect "$WORK/runs" --status "$STATUS" --write "$OUT/results.json" "$@" \
      >/dev/null 2>>"$WORK/logs/compare.err"
  tar czf "$OUT/logs.tar.gz" -C "$WORK" logs status.tsv 2>/dev/null
}

# run NAME MIN_SECONDS MAX_SECONDS CMD...: skipped if fewer than MIN_SECONDS remain; killed after MAX_SECONDS.
run() {
  local name=$1 need=$2 max=$3; shift 3
  want "$name" || return 0
  local t=$(left)
  if [ "$t" -lt "$need" ]; then
    echo "== $name: skipped ($t s left, needs ~$need)"; printf '%s\tskipped\t0\tonly %s s left\n' "$name" "$t" >> "$STATUS"
    return 0
  fi
  [ "$t" -lt "$max" ] && max=$t
  echo "== $name (limit ${max}s, $(left)s of budget left): $*"
  local s=$SECONDS
  # timeout signals its whole process group (launchers and their workers); bash -c so shell functions run too
  timeout -k 10 "$max" bash -c '"$@"' _ "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t\n' "$name" "$rc" "$((SECONDS - s))" >> "$STATUS"
  echo "   rc=$rc in $((SECONDS - s))s; $(grep -h '^\[train_scale\]' "$WORK/logs/$name.log" | tail -1)"
  [ $rc -ne 0 ] && tail -n 15 "$WORK/logs/$name.log" | sed 's/^/   | /'
  collect --no_adapters
  return 0
}

# two launchers = two simulated nodes (one GPU each, rendezvous on 127.0.0.1); both must finish
two_nodes() {
  local port=$1; shift
  local cfg=ds_configs/accelerate/zero3_multinode.yaml
  CUDA_VISIBLE_DEVICES=0 $PY -m accelerate.commands.launch --config_file $cfg --num_machines 2 --num_processes 2 \
      --machine_rank 0 --main_process_ip 127.0.0.1 --main_process_port "$port" "$@" &
  local p0=$!
  sleep 1
  CUDA_VISIBLE_DEVICES=1 $PY -m accelerate.commands.launch --config_file $cfg --num_machines 2 --num_processes 2 \
      --machine_rank 1 --main_process_ip 127.0.0.1 --main_process_port "$port" "$@" > "$WORK/logs/node1_$port.log" 2>&1 &
  local p1=$!
  trap 'kill $p0 $p1 2>/dev/null' TERM
  wait $p0; local r0=$?
  wait $p1; local r1=$?
  trap - TERM
  echo "node0 rc=$r0 node1 rc=$r1"; cat "$WORK/logs/node1_$port.log" | sed 's/^/[node1] /' | tail -n 40
  return $(( r0 != 0 ? r0 : r1 ))
}
export -f two_nodes
export PY WORK

{ echo "# $(date -u)"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | head -5
  nvidia-smi topo -m 2>&1 | head -6; $PY -c "import torch, transformers, accelerate, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
} > "$WORK/logs/env.log"; cat "$WORK/logs/env.log"

R=$WORK/runs
if [ ! -f "$WORK/model/model.safetensors" ]; then  # every run loads these seeded weights (ONLY does not skip it)
  ONLY= run init_model 30 150 env CUDA_VISIBLE_DEVICES=0 $PY $S --init_model --model_dir "$WORK/model" $EXTRA
fi
run single_gpu 60 150 env CUDA_VISIBLE_DEVICES=0 $PY $S "${COMMON[@]}" --steps "$STEPS" --name single_gpu \
    --out "$R/single_gpu" --final_adapter "$R/single_gpu/adapter"
run zero3 60 150 $PY -m accelerate.commands.launch --config_file ds_configs/accelerate/zero3_1node.yaml \
    --num_processes 2 --main_process_port 29513 $S "${COMMON[@]}" --steps "$STEPS" --name zero3 \
    --out "$R/zero3" --final_adapter "$R/zero3/adapter"
run ddp 50 120 $PY -m torch.distributed.run --nproc_per_node 2 --master_port 29511 $S "${COMMON[@]}" \
    --steps "$STEPS" --name ddp --out "$R/ddp" --final_adapter "$R/ddp/adapter"
run zero2 55 130 $PY -m torch.distributed.run --nproc_per_node 2 --master_port 29512 $S "${COMMON[@]}" \
    --deepspeed ds_configs/zero2.json --steps "$STEPS" --name zero2 --out "$R/zero2" --final_adapter "$R/zero2/adapter"
run two_node_zero3 55 130 two_nodes 29520 $S "${COMMON[@]}" --steps "$STEPS2" --save_steps "$HALF" \
    --name two_node_zero3 --out "$R/two_node_zero3" --final_adapter "$R/two_node_zero3/adapter"
run two_node_zero3_resume 50 120 two_nodes 29521 $S "${COMMON[@]}" --steps "$STEPS2" --save_steps "$HALF" \
    --resume_from "$R/two_node_zero3/train/checkpoint-$HALF" --compare_adapter "$R/two_node_zero3/adapter" \
    --name two_node_zero3_resume --out "$R/two_node_zero3_resume" --final_adapter "$R/two_node_zero3_resume/adapter"
run merge_check 25 90 env CUDA_VISIBLE_DEVICES=0 $PY $S --model_dir "$WORK/model" --seq_len 256 $EXTRA \
    --merge_check "$R/two_node_zero3_resume/adapter" --name merge_check --out "$R/merge_check"
run zero3_offload 60 150 $PY -m torch.distributed.run --nproc_per_node 2 --master_port 29514 $S "${COMMON[@]}" \
    --deepspeed ds_configs/zero3_offload.json --steps "$STEPS" --name zero3_offload --out "$R/zero3_offload" \
    --final_adapter "$R/zero3_offload/adapter"

collect
echo "== summary ($((SECONDS - T0)) s)"
$PY studies/multigpu/compare.py "$OUT/results.json" --markdown "$OUT/summary.md" --plot "$OUT/loss_curves.png" \
    2>&1 | tee "$WORK/logs/summary.txt"
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs status.tsv 2>/dev/null
ls -la "$OUT"
