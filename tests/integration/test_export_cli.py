"""`python -m sprune_trainer.export ADAPTER_DIR BASE_MODEL OUT_DIR`: a saved adapter and its base folder give the
same PEFT folder as export_peft_lora on the trained model; bad input stops before the model loads (usage, one error
line, exit code 2). In-process through main(), plus one subprocess for the real entry point."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import checkout_env, random_selection, tiny_llama_config, tiny_model
from sprune_trainer import SparseNeuronConfig, export_peft_lora, save_sparse_adapter
from sprune_trainer.export import main
from sprune_trainer.layers.surgery import inject_slices, sliced_modules


@pytest.fixture
def saved(tmp_path):
    """(adapter folder, base folder, the sliced model) for tiny_model() with seeded non-zero slices."""
    tiny_model().save_pretrained(tmp_path / "base")
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="random")
    model = tiny_model()
    inject_slices(model, random_selection(model, cfg), cfg)
    with torch.no_grad():
        for i, layer in enumerate(sliced_modules(model).values()):
            layer.delta.normal_(generator=torch.Generator().manual_seed(i))
    save_sparse_adapter(model, str(tmp_path / "adapter"))
    return str(tmp_path / "adapter"), str(tmp_path / "base"), model


def test_a_saved_adapter_exports_as_the_trained_model_does(saved, tmp_path, capsys):
    adapter, base, model = saved
    assert main([adapter, base, str(tmp_path / "cli")]) == 0
    assert "14 layers" in capsys.readouterr().out
    export_peft_lora(model, str(tmp_path / "direct"), base_model=base)
    cli, direct = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("cli", "direct"))
    assert cli.keys() == direct.keys() and all(torch.equal(cli[k], direct[k]) for k in cli)
    config = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "direct" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base


def _error_line(capsys, argv, loading=False) -> str:
    """The error line; before the usage line only transformers' loading progress, when the model loaded."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-2].startswith("usage:"), err
    assert all(line.startswith("Loading weights") for line in err[:-2]) if loading else len(err) == 2, err
    return err[-1]


def test_bad_input_stops_before_the_model_loads(saved, tmp_path, capsys, monkeypatch):
    adapter, base, _ = saved
    (tmp_path / "a_file").write_text("x")
    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", no_load)
    assert "ADAPTER_DIR" in _error_line(capsys, [str(tmp_path / "missing"), base, str(tmp_path / "out")])
    assert "ADAPTER_DIR" in _error_line(capsys, [base, base, str(tmp_path / "out")])  # a model, not an adapter
    assert "OUT_DIR" in _error_line(capsys, [adapter, base, str(tmp_path / "a_file")])
    for no_folder in (str(tmp_path / "a_file"), str(tmp_path / "no_such_model")):
        assert "BASE_MODEL" in _error_line(capsys, [adapter, no_folder, str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_base_that_does_not_load_or_fit_is_one_error_line(saved, tmp_path, capsys):
    adapter, _, _ = saved
    tiny_model(tiny_llama_config(hidden_size=64)).save_pretrained(tmp_path / "wider")
    capsys.readouterr()  # the progress bar of that save
    assert "BASE_MODEL" in _error_line(capsys, [adapter, "no-such-org/no-such-model", str(tmp_path / "out")])
    assert "does not fit" in _error_line(capsys, [adapter, str(tmp_path / "wider"), str(tmp_path / "out")], True)
    assert not (tmp_path / "out").exists()


def test_python_dash_m_entry_point(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sprune_trainer.export", str(tmp_path), str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, env=checkout_env(HF_HUB_OFFLINE="1"), timeout=120)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and err[-2].startswith("usage: python -m sprune_trainer.export"), run.stderr
    assert "is not a sparse adapter directory" in err[-1]
