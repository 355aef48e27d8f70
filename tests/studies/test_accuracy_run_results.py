"""studies/accuracy/run_results.py: committed runs are gzipped; the aggregate reads them as before and the
sweep counts them as finished."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


from helpers import REPO
from studies.accuracy import aggregate, run_results
from studies.accuracy.launcher import Job, SweepLog, run_jobs


def _finished_run(out: Path, name: str, average: float) -> Path:
    d = out / "runs" / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": name, "phase": "test", "config": "lora_r16", "family": "lora",
                                            "seed": int(name[-1]), "learning_rate": 5e-4}))
    samples = [{"output": "the correct answer is true", "pred": "true", "answer": "true"}] * 200
    (d / "results.json").write_text(json.dumps({"after": {"tasks": {"boolq": {"accuracy": average, "n": 200,
                                                                                "samples": samples}},
                                                          "average": average}}))
    return d


def test_pack_keeps_content_is_deterministic_and_aggregates_the_same(tmp_path):
    dirs = [_finished_run(tmp_path, f"test-lora_r16-lr5e-4-s{s}", a) for s, a in ((1, 0.5), (2, 0.7))]
    plain = {d.name: json.loads((d / "results.json").read_text()) for d in dirs}
    def table() -> str:  # as JSON text, where NaN equals NaN
        return json.dumps(aggregate.summarize(aggregate.load_runs(tmp_path)))

    before = table()
    (tmp_path / "runs" / "unfinished").mkdir()  # nothing to pack there
    packed = run_results.pack_all(tmp_path)
    assert [p.parent for p in packed] == dirs
    for d in dirs:
        assert not (d / "results.json").exists() and run_results.find(d) == d / "results.json.gz"
        assert run_results.read(d) == plain[d.name]
        assert (d / "results.json.gz").stat().st_size < (len(json.dumps(plain[d.name])) / 10)
    assert run_results.read(tmp_path / "runs" / "unfinished") is None
    assert table() == before and '"n_seeds": 2' in before
    # packing the same content again gives the same bytes (no timestamp in the gzip header): no git churn
    first = (dirs[0] / "results.json.gz").read_bytes()
    (dirs[0] / "results.json").write_text(json.dumps(plain[dirs[0].name]))
    run_results.pack(dirs[0])
    assert (dirs[0] / "results.json.gz").read_bytes() == first


def test_a_packed_run_is_not_run_again(tmp_path):
    d = _finished_run(tmp_path, "test-lora_r16-lr5e-4-s1", 0.5)
    run_results.pack(d)
    marker = tmp_path / "ran"
    job = Job(d.name, [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], d, {"phase": "test"})
    st = run_jobs([job], parallel=1, log=SweepLog(tmp_path / "log.txt", time.time()), t0=time.time())
    assert st.done_before == [d.name] and not st.finished and not marker.exists()


def test_runs_in_flight_when_copied_are_dropped_finished_and_failed_kept(tmp_path):
    """stage qwen15-bg copies the sweep folder while runs go on: their folders (run.json + a partial log) must
    not be committed as if they were runs; a failed run's folder keeps its failures.txt (the retry limit)."""
    done = _finished_run(tmp_path, "test-lora_r16-lr5e-4-s1", 0.5)
    in_flight, failed = tmp_path / "runs" / "test-lora_r16-lr5e-4-s2", tmp_path / "runs" / "test-lora_r16-lr5e-4-s3"
    for d in (in_flight, failed):
        d.mkdir()
        (d / "run.json").write_text("{}")
        (d / "log.txt").write_text("step 10 of 375\n")
    (failed / run_results.FAILURES).write_text("exit code 1 after 99 s\n")
    assert run_results.drop_in_flight(tmp_path) == [in_flight]
    assert not in_flight.exists() and (failed / "log.txt").is_file() and run_results.find(done) is not None
    assert run_results.drop_in_flight(tmp_path) == []


def test_per_run_plots_are_dropped_and_redraw_from_the_committed_results(tmp_path):
    """The recipe's results.png of a finished run is removed (it weighs in every device call's copy of the
    tree); a committed run's results.json.gz alone redraws it."""
    from commonsense import report

    done = _finished_run(tmp_path, "test-lora_r16-lr5e-4-s1", 0.5)
    going = tmp_path / "runs" / "test-lora_r16-lr5e-4-s2"
    going.mkdir()
    for d in (done, going):
        (d / run_results.RUN_PLOT).write_bytes(b"\x89PNG")
    assert run_results.drop_run_plots(tmp_path) == [done / run_results.RUN_PLOT]
    assert not (done / run_results.RUN_PLOT).exists() and (going / run_results.RUN_PLOT).is_file()
    committed = REPO / "studies/accuracy/results/qwen15/runs/test-lora_r16-lr3e-4-s1"
    assert not (committed / run_results.RUN_PLOT).exists()
    res = run_results.read(committed)
    png = report.plot_before_after(res.get("before"), res.get("after"), tmp_path / "redrawn.png", "lora_r16")
    assert png.read_bytes()[:4] == b"\x89PNG"
