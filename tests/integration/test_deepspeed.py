"""DeepSpeed integration as far as a CPU allows (DeepSpeed selects its CPU accelerator here)."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO, checkout_env, free_port

ROOT = str(REPO)
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def test_configs_have_no_optimizer_block_and_auto_values():
    assert {os.path.basename(c) for c in CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}
    for path in CONFIGS:
        cfg = json.load(open(path))
        assert "optimizer" not in cfg, f"{path}: an optimizer block would replace SliceAdamW"
        assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
        if "offload_optimizer" in cfg["zero_optimization"]:
            assert cfg["zero_force_ds_cpu_optimizer"] is False, f"{path}: DeepSpeedCPUAdam would be forced"


def test_accelerate_yamls_point_at_existing_configs():
    yaml = pytest.importorskip("yaml")
    for path in glob.glob(os.path.join(ROOT, "ds_configs", "accelerate", "*.yaml")):
        cfg = yaml.safe_load(open(path))
        assert cfg["distributed_type"] == "DEEPSPEED"
        assert os.path.isfile(os.path.join(ROOT, cfg["deepspeed_config"]["deepspeed_config_file"])), path


def _run(config, out, *extra):
    env = checkout_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                       LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", CUDA_VISIBLE_DEVICES="")
    worker = os.path.join(ROOT, "tests", "integration", "deepspeed_worker.py")
    proc = subprocess.run([sys.executable, worker, config, str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_train_save_resume_under_deepspeed(tmp_path, name):
    pytest.importorskip("deepspeed")
    config = os.path.join(ROOT, "ds_configs", name)
    full = _run(config, tmp_path)
    assert full["slice_adamw"], full["client_optimizer"]  # DeepSpeed wraps our optimizer, not its own
    assert full["partitioned_at_load"] == (name == "zero3.json")
    # the adapter holds real values (a known PEFT failure is an empty adapter under ZeRO-3)
    deltas = full["deltas"]
    assert len(deltas) == 14 and all(len(v) == 4 for v in deltas.values())
    assert sum(abs(x) for v in deltas.values() for row in v for x in row) > 0
    assert full["checkpoint_bytes"] < 200_000  # slices + their optimizer state, not the frozen base
    resumed = _run(config, tmp_path, "resume")
    assert resumed["selection"] == full["selection"]
    assert resumed["deltas"] == full["deltas"]  # CPU: resume continues to identical weights


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_nonfinite_step_is_skipped_inside_deepspeed(tmp_path, name):
    """DeepSpeed steps our optimizer from inside its ZeRO wrapper (on its flat partitions): the guard still skips."""
    pytest.importorskip("deepspeed")
    run = _run(os.path.join(ROOT, "ds_configs", name), tmp_path, "nan")
    assert run["slice_adamw"] and run["skipped_steps"] == [2]
    values = [x for v in run["deltas"].values() for row in v for x in row]
    assert all(math.isfinite(x) for x in values) and any(values)


@pytest.mark.slow
def test_moe_experts_train_and_resume_under_zero3(tmp_path):
    """A Mixtral's fused experts (transformers 5.x; nn.Linear experts in 4.x), partitioned by ZeRO-3: sliced, trained,
    saved with real values, and a resume continues to the same slices."""
    pytest.importorskip("deepspeed")
    config = os.path.join(ROOT, "ds_configs", "zero3.json")
    full = _run(config, tmp_path, "moe")
    assert full["slice_adamw"] and full["partitioned_at_load"]
    experts = {k: v for k, v in full["deltas"].items() if ".experts." in k}
    assert len(experts) >= 2 * 4 * 2 and all(any(x for row in v for x in row) for v in experts.values())
    resumed = _run(config, tmp_path, "resume", "moe")
    assert resumed["selection"] == full["selection"] and resumed["deltas"] == full["deltas"]
