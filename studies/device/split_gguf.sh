#!/usr/bin/env bash
# Splits the SmolLM2 GGUF (98 MB, from ../shared/tools/smollm2_parts.sh) into .m/p0, .m/p1, .m/p2 for the device
# machine: a call carries at most 64 MiB including the working tree (~7 MB), so p0 (31 MB) travels with .olmo
# (9 MB), p1 (40 MB) alone, p2 (the rest, 27 MB) with .whl and .data (.whl-bnb, 42 MB, goes in a call of
# its own); each call keeps ~20 MB of room for the tree to grow.
# studies/device/device_run.sh (stages `stage` and `install`) joins them again in name order.
set -euo pipefail
src=.m/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$src" ] || { echo "missing $src: run ../shared/tools/smollm2_parts.sh first" >&2; exit 1; }
rm -rf .m/p0 .m/p1 .m/p2 && mkdir -p .m/p0 .m/p1 .m/p2
part() { dd if="$src" of="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" ${3:+count=$3} status=none; }
part .m/p0/part00 0 31000000
part .m/p1/part01 31000000 40000000
part .m/p2/part02 71000000
cat .m/p0/part00 .m/p1/part01 .m/p2/part02 | cmp - "$src" && ls -la .m/p0 .m/p1 .m/p2
