"""docs/configuration.md's field table, generated from SparseNeuronConfig's own field docs (the one source: the same
text is the recipe's --help), so the reference cannot drift from the code.

    python docs/make_config_reference.py            # rewrite the table in docs/configuration.md
    python docs/make_config_reference.py --check    # exit 1 if it is stale"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sprune_trainer import SparseNeuronConfig  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
START, END = "<!-- config-fields -->\n", "<!-- /config-fields -->\n"


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "—" if value is None else f"`{value}`"


def table() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(SparseNeuronConfig):
        text = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
        lines.append(f"| `{f.name}` | {_default(f)} | {text} |")
    return "\n".join(lines) + "\n"


def render(doc: str) -> str:
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC} lacks the {START.strip()} ... {END.strip()} block")
    head, rest = doc.split(START, 1)
    return head + START + table() + END + rest.split(END, 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    a = ap.parse_args()
    doc = DOC.read_text()
    new = render(doc)
    if a.check:
        sys.exit(0 if new == doc else 1)
    DOC.write_text(new)


if __name__ == "__main__":
    main()
