"""docs/accuracy.md's table is the one readme_table.py generates from the committed accuracy.json (the docs cannot
drift from the results), and --write replaces only its block."""
import pytest

from helpers import REPO
from studies.accuracy import readme_table

FOLDER = "studies/accuracy/results/qwen15"


def test_readme_block_matches_the_committed_results(monkeypatch):
    monkeypatch.chdir(REPO)
    text = (REPO / "docs" / "accuracy.md").read_text()
    start = f"<!-- readme_table: {FOLDER} -->\n"
    assert start in text, "docs/accuracy.md lost its accuracy table block"
    inside = text.split(start, 1)[1].split(readme_table.END, 1)[0]
    assert inside == readme_table.block(FOLDER), (
        f"docs/accuracy.md's table differs from {FOLDER}/accuracy.json: run "
        f"python studies/accuracy/readme_table.py {FOLDER} --write docs/accuracy.md")
    # what the table is made of: every test config of the results, and the targets
    assert inside.count("\n| ") >= 9 and "Targets of issue 17" in inside


def test_write_replaces_only_the_block(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n<!-- readme_table: {FOLDER} -->\nstale\n{readme_table.END}\nafter\n")
    assert readme_table.write(readme, FOLDER) is True
    assert readme.read_text() == (f"before\n<!-- readme_table: {FOLDER} -->\n{readme_table.block(FOLDER)}"
                                  f"{readme_table.END}\nafter\n")
    assert readme_table.write(readme, FOLDER) is False  # a second write changes nothing
    readme.write_text("no block\n")
    with pytest.raises(SystemExit, match="no '<!-- readme_table"):
        readme_table.write(readme, FOLDER)
