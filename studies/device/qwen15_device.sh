#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct on the device machine (one H200): staging, the bf16 non-finite investigation
# (issue 16) and its bf16 / fp32 comparison. Prepare here once (all git-ignored):
#   bash ../shared/tools/qwen15_parts.sh   -> .m/q15/p00 .. p21 (22 parts of <= 50 MiB)
#   bash ../shared/tools/gpu_wheels.sh     -> .whl (gguf, datasets, evaluate, deepspeed ...)
#   mkdir -p .data && cp -r ../shared/data/commonsense .data/ ; .olmo/hf_datasets.tgz (see device_run.sh)
# /tmp on the device survives only while the machine stays warm (30 s idle): issue the calls back to back.
#   call 1:      carry [".m/q15/p00", ".whl"]                bash studies/device/qwen15_device.sh stage
#   calls 2..21: carry [".m/q15/pNN"]                       bash studies/device/qwen15_device.sh stage
#   call 22:     carry [".m/q15/p21", ".whl", ".data", ".olmo"]
#                bash studies/device/qwen15_device.sh stage install scan issue16
#   then:        bash studies/device/qwen15_device.sh collect     (waits for runs still going, packs results)
# The first part holds the GGUF's metadata: from call 1 on, gguf_convert.py's `meta` makes the config, tokenizer and
# tensor layout in the background (on that part padded to the file's size). install: the GGUF is checked (sha256),
# and its weights dequantized in parallel into the float32 safetensors folder /tmp/q15 (the same bytes as
# recipes/commonsense/modeling._load_gguf + save_pretrained, in ~1/5 of its ~100 s).
# Results: $OUT/results.tgz (outputs/device/ elsewhere) holding runs/<name>/{results.json,log.txt}, scan*.json.
set -uo pipefail
SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
SIZE=1117320768  # its bytes
MODEL=/tmp/q15
RUNS=/tmp/runs
FINAL=${OUT:-outputs/device}
PACK=$(mktemp -d /tmp/pack.XXXX)
mkdir -p "$FINAL" "$RUNS"
pack() {  # small files only: logs, results, scans (no checkpoints)
  (cd /tmp && find runs -maxdepth 2 \( -name results.json -o -name log.txt \) -print0 | tar czf "$PACK/r.tgz" --null -T -)
  cp /tmp/scan*.json "$PACK/" 2>/dev/null
  tar czf "$FINAL/results.tgz" -C "$PACK" . && ls -la "$FINAL"
}
trap pack EXIT
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} SPRUNE_TRAINER_CACHE=/tmp/sc PYTHONUNBUFFERED=1
source "$(dirname "$0")/device_common.sh"  # stage_parts, install_site_and_data
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# the issue-16 command (sparse random rows r32, lr 3e-4, 6,000 examples, 1 epoch), its dtype and attention as $2..
recipe() {  # name dtype bf16 [extra flags...]
  local name=$1 dtype=$2 bf16=$3
  shift 3
  mkdir -p "$RUNS/$name"
  setsid nohup python ${WRAP:-} recipes/llama_commonsense.py --model_name_or_path "$MODEL" --dtype "$dtype" --bf16 "$bf16" \
    --data_dir /tmp/data/commonsense --max_train_samples 6000 --max_eval_samples 200 \
    --per_device_train_batch_size 16 --eval_batch_size 64 --num_train_epochs 1 --seed 0 --logging_steps 1 \
    --eval_before false --method sparse --importance random --neurons_per_layer 32 --learning_rate 3e-4 \
    --extra_eval ARC-Challenge,openbookqa --report_to none --disable_tqdm true \
    --output_dir "$RUNS/$name" "$@" > "$RUNS/$name/log.txt" 2>&1 &
}
start_meta() {  # once the first part is here: config, tokenizer and tensor layout, in the background
  [ -f /tmp/m/part00 ] && [ ! -f /tmp/meta.pid ] && [ -d .whl ] || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl || return 0
  cp /tmp/m/part00 /tmp/meta.gguf && truncate -s "$SIZE" /tmp/meta.gguf || return 0
  setsid nohup python studies/device/gguf_convert.py meta /tmp/meta.gguf "$MODEL" > /tmp/meta.log 2>&1 < /dev/null &
  echo $! > /tmp/meta.pid
}
convert_model() {  # /tmp/q15.gguf -> $MODEL: the metadata from start_meta (or now, from the whole file), then the weights
  local pid
  pid=$(cat /tmp/meta.pid 2>/dev/null)
  while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do sleep 1; done
  [ -f /tmp/meta.log ] && tail -1 /tmp/meta.log
  [ -f "$MODEL/gguf_layout.json" ] || python studies/device/gguf_convert.py meta /tmp/q15.gguf "$MODEL" || return 1
  python studies/device/gguf_convert.py tensors /tmp/q15.gguf "$MODEL" 2>&1 | grep -v "^dequantizing"
  [ -f "$MODEL/model.safetensors" ]
}
convert_slowly() {  # the fallback: transformers' own conversion (~100 s), what gguf_convert.py reproduces
  rm -rf "$MODEL"
  python - <<'PY'
import sys, time, torch
sys.path.insert(0, "recipes")
from pathlib import Path
from commonsense.modeling import _load_gguf
t = time.time()
model, tok = _load_gguf(Path("/tmp/q15.gguf"), dtype=torch.float32)
model.save_pretrained("/tmp/q15"); tok.save_pretrained("/tmp/q15")
print(f"converted by transformers in {time.time() - t:.0f} s")
PY
}
# studies/nonfinite/scan_batches.py on the staged model and data in bf16 (an array, so setsid / timeout can run it)
SCAN=(python studies/nonfinite/scan_batches.py --model_name_or_path "$MODEL" --data_dir /tmp/data/commonsense
      --dtype bfloat16)
wait_runs() {  # until no recipe runs or $1 seconds ($2: only the run of that name)
  local t=0
  while pgrep -f "^python .*llama_commonsense.py .*/tmp/runs/${2:-}" > /dev/null && [ $t -lt "$1" ]; do
    sleep 5; t=$((t + 5)); done
  for f in "$RUNS"/*/log.txt; do echo "--- $f"; grep -E "non-finite|final loss|average|Error|error" "$f" | tail -4; done
}

for stage in "$@"; do
  echo "== $stage"
  case $stage in
    stage) stage_parts '.m/q15/p*/part??' || exit 1; start_meta ;;
    install)
      install_site_and_data || exit 1
      cat /tmp/m/part?? > /tmp/q15.gguf && echo "$SHA  /tmp/q15.gguf" | sha256sum -c || exit 1
      t=$SECONDS; convert_model || convert_slowly || exit 1; echo "converted to $MODEL in $((SECONDS - t)) s"
      nvidia-smi -L
      python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" ;;
    scan)  # the frozen pretrained model on every training batch, bf16, every weight's gradient
      setsid nohup "${SCAN[@]}" --variants sdpa,eager,sdpa-math,sdpa-efficient,sdpa-cudnn --out /tmp/scan_base.json \
        > /tmp/scan_base.log 2>&1 & ;;
    issue16)
      recipe bf16_sdpa bfloat16 true --save_strategy steps --save_steps 283
      recipe fp32_sdpa float32 false
      recipe bf16_eager bfloat16 true --attn_implementation eager
      wait_runs "${RUN_WAIT:-420}"
      tail -3 /tmp/scan_base.log
      # the step the guard skipped first, replayed with the weights of checkpoint-283 (the run's own weights)
      step=$(python -c "import json; s=json.load(open('$RUNS/bf16_sdpa/results.json'))['training']['nonfinite_steps']; print(s[0] if s else 284)" 2>/dev/null || echo 284)
      [ -d "$RUNS/bf16_sdpa/checkpoint-283" ] && "${SCAN[@]}" --steps "$step,284" \
        --adapter_dir "$RUNS/bf16_sdpa/checkpoint-283" --variants sdpa,eager,sdpa-math,sdpa-efficient,sdpa-cudnn --out /tmp/scan_trained.json 2>&1 | tail -4 ;;
    issue16b)  # cuDNN attention off (the fix's check), and the NaN step replayed on the run's own weights
      WRAP=studies/nonfinite/no_cudnn_sdpa.py recipe bf16_nocudnn bfloat16 true
      recipe bf16_to271 bfloat16 true --max_steps 271 --save_strategy steps --save_steps 271 --eval_after false \
        --save_adapter false
      scan272() {  # $1: out name, rest: extra flags
        local out=$1; shift
        timeout 200 "${SCAN[@]}" --steps 272 --variants sdpa,sdpa-cudnn,sdpa-efficient,sdpa-math,eager --out "/tmp/$out" "$@" \
          2>&1 | grep -v tokeniz | tail -3
      }
      wait_runs 240 bf16_to271
      ckpt=$(ls -d "$RUNS"/bf16_to271/checkpoint-* 2>/dev/null | head -1)
      [ -n "$ckpt" ] && scan272 scan_trained272.json --adapter_dir "$ckpt"
      wait_runs "${RUN_WAIT:-200}" ;;
    collect) wait_runs "${RUN_WAIT:-540}"; tail -3 /tmp/scan_base.log ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
