"""The docs agree with the code: the configuration reference is the fields' own docs, README's file map names every
subpackage, and every link in README and docs/ points to a file that exists."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _reference():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_config_reference", REPO / "docs" / "make_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_field_docs():
    ref = _reference()
    doc = ref.DOC.read_text()
    assert ref.render(doc) == doc, "docs/configuration.md is stale: run python docs/make_config_reference.py"
    from sprune_trainer import SparseNeuronConfig
    import dataclasses
    for f in dataclasses.fields(SparseNeuronConfig):
        assert f"| `{f.name}` |" in doc and f.metadata.get("help"), f.name  # every field, each with its doc


def test_readme_is_an_entrance_with_a_file_map_of_every_subpackage():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    file_map = text.split("## File map", 1)[1]
    for sub in sorted(p.parent.name for p in (REPO / "sprune_trainer").glob("*/__init__.py")):
        assert f"  {sub}/" in file_map, sub


def test_every_relative_link_resolves():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"


def test_readme_snippet_names_every_criterion():
    from sprune_trainer.config import IMPORTANCE_NAMES
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if "importance=" in x and "#" in x)
    assert line.split("#", 1)[1].split() == " | ".join(IMPORTANCE_NAMES).split(), line
