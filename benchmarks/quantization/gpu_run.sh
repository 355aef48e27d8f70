#!/usr/bin/env bash
# The GPU part of issue 6 on the device machine (nvidia-h100-x1): the quantization tests on cuda, then the
# reconstruction-error and merge/re-quantize benchmarks on real SmolLM2-135M and random-init Llama-2-7B shapes.
# The 64 MiB carry limit splits the staging over calls; /tmp survives between calls while the machine stays warm.
# Prepare here once: bash ../shared/tools/smollm2_parts.sh (.m/a, .m/b) and ../shared/tools/gpu_wheels.sh
# (.whl, .whl-bnb). Then one `run` call each, in order, from the project root:
#   1. carry [".m/a"]          command: bash benchmarks/quantization/gpu_run.sh stage-a
#   2. carry [".whl-bnb"]      command: bash benchmarks/quantization/gpu_run.sh stage-bnb
#   3. carry [".m/b", ".whl"]  command: bash benchmarks/quantization/gpu_run.sh install tests recon-smollm2
#   4. no carry                command: bash benchmarks/quantization/gpu_run.sh recon-7b
#   5. no carry                command: bash benchmarks/quantization/gpu_run.sh requant
#   (any call) no carry       command: bash benchmarks/quantization/gpu_run.sh speed   (needs only bitsandbytes)
# JSON results go to $OUT (the device's result folder; outputs/quant when run elsewhere), summaries to stdout.
set -uo pipefail
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
B=benchmarks/quantization
OUT=${OUT:-outputs/quant}
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
for stage in "$@"; do
  echo "== $stage"
  case $stage in
    stage-a) mkdir -p /tmp/m && cp .m/a/part00 /tmp/m/ ;;
    stage-bnb) mkdir -p /tmp/w && cp .whl-bnb/*.whl /tmp/w/ ;;
    install)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl /tmp/w/*.whl || exit 1
      cat /tmp/m/part00 .m/b/part01 > "$GGUF" || exit 1
      nvidia-smi -L
      python -c "import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__)" ;;
    tests) python -m pytest -q -rs -p no:cacheprovider tests/test_quantization.py tests/test_quantization_benchmarks.py 2>&1 | tail -25 ;;
    recon-smollm2) python $B/reconstruction_error.py --gguf "$GGUF" --layers all --out "$OUT/recon_smollm2.json" 2>&1 | tail -9 ;;
    recon-7b) python $B/reconstruction_error.py --shapes llama2-7b --out "$OUT/recon_llama2_7b.json" 2>&1 | tail -16 ;;
    requant)
      python $B/merge_requantize.py --gguf "$GGUF" --layers all --model_level --out "$OUT/requant_smollm2.json" 2>&1 | tail -9
      python $B/merge_requantize.py --shapes llama2-7b --out "$OUT/requant_llama2_7b.json" 2>&1 | tail -14 ;;
    speed) python $B/qlora_speed.py --shapes smollm2-135m,llama2-7b --out "$OUT/qlora_speed.json" 2>&1 | tail -14 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
