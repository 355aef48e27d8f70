"""Run many commands as subprocesses, P slots at a time, resumably and within a time budget.

- A job takes `slots` of the P (default 1; e.g. a run that needs three times the GPU memory takes 3); jobs start
  in order, so a big one waits until enough slots are free.
- A job whose `<run_dir>/results.json` (or its gzipped copy, run_results.py) exists is skipped (a crash or a
  timeout loses nothing finished).
- `time_budget_s`: a job is not launched when `elapsed + estimate` would exceed it, the estimate being the longest
  duration of the finished jobs of its config and phase (else of its phase, else of its config in another phase,
  else none: it is launched; the longest, not the mean, since a short job, e.g. an evaluation-only one, would let a
  long one start that the deadline then kills).
  A job that does not fit is passed over, not the end of launching: a shorter one after it may still fit (a DoRA
  run's ~7 min would otherwise keep a 3-min sparse run from the budget's last minutes). Running jobs are left
  alone.
- A job that failed (non-zero exit, not killed by us) gets a line in `<run_dir>/failures.txt`; with
  `max_failures`, a job that failed that often is not launched again (`given_up`: a deterministic failure, e.g. a
  diverged run, would otherwise take its GPU share in every call; delete the file to retry it).
- `deadline_s`: the hard stop; jobs still running then are killed (SIGTERM, then SIGKILL, by pid); a job
  also dies with the launching process (Linux: PR_SET_PDEATHSIG).
- One log line per finished job (name, seconds, the caller's summary) to stdout and the log file.
Times count from `t0`, the caller's start, so that several calls (phases) share one budget."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from studies.accuracy import run_results

FAILURES = run_results.FAILURES


@dataclass
class Job:
    name: str
    argv: list[str]
    run_dir: Path
    meta: dict = field(default_factory=dict)   # written to <run_dir>/run.json at launch ("phase" used for estimates)
    slots: int = 1                             # of run_jobs' `parallel`

    @property
    def finished(self) -> bool:
        """The run left its results (run_results.py: plain as written, or gzipped as committed)."""
        return run_results.find(self.run_dir) is not None

    @property
    def failures(self) -> int:
        """How often it failed (lines of <run_dir>/failures.txt)."""
        path = self.run_dir / FAILURES
        return len(path.read_text().splitlines()) if path.is_file() else 0


class SweepLog:
    """Timestamped lines (seconds since t0) to stdout and appended to a file."""

    def __init__(self, path: Path, t0: float):
        self.path, self.t0 = Path(path), t0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f} s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


@dataclass
class Stats:
    done_before: list[str] = field(default_factory=list)
    finished: dict[str, float] = field(default_factory=dict)   # name -> seconds
    failed: dict[str, int] = field(default_factory=dict)       # name -> exit code
    killed: list[str] = field(default_factory=list)
    not_launched: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)          # failed max_failures times before: not launched


def _estimate(durations: list[tuple[Optional[str], Optional[str], float]], meta: dict) -> Optional[float]:
    """The longest finished duration of the job's (phase, config), else of its phase, else of its config in
    another phase (a solo run's first estimate: its config's accuracy run, which is longer), else None."""
    phase, config = meta.get("phase"), meta.get("config")
    for keep in (lambda p, c: (p, c) == (phase, config), lambda p, c: p == phase,
                 lambda p, c: config is not None and c == config):
        pool = [d for p, c, d in durations if keep(p, c)]
        if pool:
            return max(pool)
    return None


def _kill(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop a job we started (by its pid): SIGTERM, then SIGKILL."""
    for stop, wait in ((proc.terminate, grace_s), (proc.kill, 5.0)):
        if proc.poll() is not None:
            return
        stop()
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the job gets SIGKILL if the sweep dies (even by SIGKILL), so no run outlives it on the device."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_jobs(jobs: list[Job], parallel: int, log: SweepLog, t0: float, env: Optional[dict] = None,
             time_budget_s: Optional[float] = None, deadline_s: Optional[float] = None,
             summary: Callable[[Job], str] = lambda job: "", cwd: Optional[str] = None,
             history: Optional[list[tuple[Optional[str], Optional[str], float]]] = None, poll_s: float = 0.2,
             max_failures: Optional[int] = None) -> Stats:
    """Run `jobs` in order, at most `parallel` slots at once (a job wider than that takes them all). `history`
    (phase, config, seconds) of earlier finished jobs seeds the duration estimate and is extended with this call's.
    Running jobs are killed on the way out of an exception (KeyboardInterrupt included)."""
    stats = Stats()
    history = history if history is not None else []
    pending = []
    for job in jobs:
        if job.finished:
            stats.done_before.append(job.name)
        elif max_failures is not None and job.failures >= max_failures:
            stats.given_up.append(job.name)
        else:
            pending.append(job)
    if stats.done_before:
        log(f"{len(stats.done_before)} of {len(jobs)} runs already have results.json: skipped")
    if stats.given_up:
        log(f"{len(stats.given_up)} runs failed {max_failures} times before, not launched again (their "
            f"{FAILURES}): {stats.given_up}")
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    over_budget: list[Job] = []  # passed over: the time budget had no room for them
    stop_reason = None
    try:
        while pending or running:
            elapsed = time.time() - t0
            if deadline_s is not None and elapsed >= deadline_s:
                for name, (job, proc, start) in running.items():
                    _kill(proc)
                    stats.killed.append(name)
                    log(f"KILLED {name} at the deadline ({deadline_s:.0f} s) after {time.time() - start:.1f} s")
                running.clear()
                stop_reason = stop_reason or f"deadline {deadline_s:.0f} s reached"
                break
            # finished jobs
            for name in [n for n, (_, p, _) in running.items() if p.poll() is not None]:
                job, proc, start = running.pop(name)
                secs = time.time() - start
                if proc.returncode == 0 and job.finished:
                    stats.finished[name] = secs
                    history.append((job.meta.get("phase"), job.meta.get("config"), secs))
                    log(f"done {name}  {secs:.1f} s  {summary(job)}".rstrip())
                else:
                    stats.failed[name] = proc.returncode
                    with open(job.run_dir / FAILURES, "a") as f:
                        f.write(f"exit code {proc.returncode} after {secs:.0f} s\n")
                    log(f"FAILED {name}  {secs:.1f} s  exit code {proc.returncode} (see {job.run_dir / 'log.txt'})")
            # launches, in order; a job the budget has no room for is passed over for good
            while pending:
                job = pending[0]
                est = _estimate(history, job.meta)
                elapsed = time.time() - t0
                if time_budget_s is not None and elapsed + (est or 0.0) > time_budget_s:
                    over_budget.append(pending.pop(0))
                    stop_reason = (f"time budget {time_budget_s:.0f} s: {elapsed:.0f} s elapsed + ~{est or 0:.0f} s "
                                   "for the run would exceed it")
                    continue
                if sum(min(j.slots, parallel) for j, _, _ in running.values()) + min(job.slots, parallel) > parallel:
                    break
                job.run_dir.mkdir(parents=True, exist_ok=True)
                (job.run_dir / "run.json").write_text(json.dumps({**job.meta, "argv": job.argv}, indent=2))
                with open(job.run_dir / "log.txt", "w") as out:
                    proc = subprocess.Popen(job.argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                running[job.name] = (job, proc, time.time())
                pending.pop(0)
            if not pending and not running:
                break
            time.sleep(poll_s)
    except BaseException as e:
        for name, (_, proc, _) in running.items():
            _kill(proc)
            stats.killed.append(name)
        log(f"stopped by {type(e).__name__}: killed {stats.killed or 'nothing'}")
        raise
    skipped = {id(j) for j in over_budget + pending}
    stats.not_launched = [j.name for j in jobs if id(j) in skipped]  # in the jobs' order
    if stats.not_launched:
        log(f"not launched ({stop_reason}): {len(stats.not_launched)} runs, from {stats.not_launched[0]}")
    return stats
