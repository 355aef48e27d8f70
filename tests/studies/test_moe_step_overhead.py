"""The MoE step-overhead study (studies/moe_step_overhead/step_time.py) runs on a few experts: every method's steps
are timed and split into phases, ours runs the grouped experts path, and the committed results hold the README's
medians."""
import json
from pathlib import Path

import pytest

from studies.moe_step_overhead import step_time

RESULTS = Path(step_time.__file__).parent / "results"


def test_step_time_script_on_a_few_experts(tmp_path):
    result = step_time.main(["--layers", "1", "--experts", "8", "--top-k", "2", "--warmup", "1", "--steps", "2",
                             "--profile", "ours", "--top", "5", "--tmp", str(tmp_path / "runs"),
                             "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "step_time.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "out" / "profile_ours.txt").read_text().count("cProfile by") == 2
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["ours", "lora", "floor"] and all(r["steps"] == 2 for r in rows.values())
    assert rows["ours"]["grouped_path"] is (rows["ours"]["experts_implementation"] == "grouped_mm")
    assert {"forward (compute_loss)", "backward", "optimizer step"} <= set(rows["ours"]["phases_ms"])
    tensors = [rows[m]["trainable_tensors"] for m in ("floor", "lora", "ours")]
    assert tensors == sorted(tensors) and tensors[0] == 0 < tensors[1]


@pytest.mark.parametrize("folder,layers", [("cpu_before", 4), ("cpu_after", 4), ("cpu_before_8layers", 8),
                                           ("cpu_after_8layers", 8)])
def test_committed_results_are_in_the_readme(folder, layers):
    result = json.loads((RESULTS / folder / "step_time.json").read_text())
    readme = (RESULTS.parent / "README.md").read_text()
    assert result["args"]["layers"] == layers
    ours = next(r for r in result["rows"] if r["method"] == "ours")
    assert f"**{ours['step_ms_median']:.1f}**" in readme
