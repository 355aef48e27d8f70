"""Every SparseNeuronConfig field is a flag of the recipe (built from the dataclass): the fields of issue 20 parse
into the config, defaults included, and a bad value is refused by the config's own validation (as the recipe's
one-line error, exit code 2)."""
import pytest

import llama_commonsense  # recipes/, on sys.path through pyproject


def _config(*flags):
    return llama_commonsense.to_sparse_config(llama_commonsense.parse_args([*flags, "--output_dir", "/tmp/unused"])[2])


def test_new_fields_are_recipe_flags(capsys):
    config = _config("--importance", "taylor", "--taylor_form", "elementwise", "--head_balanced", "true",
                     "--slice_dropout", "0.05", "--calibration_micro_batch_size", "2", "--recompute_slice_inputs", "true")
    assert (config.taylor_form, config.head_balanced, config.slice_dropout, config.calibration_micro_batch_size,
            config.recompute_slice_inputs) == ("elementwise", True, 0.05, 2, True)
    assert _config("--importance", "wanda").importance == "wanda"
    assert _config("--calibration_micro_batch_size", "auto").calibration_micro_batch_size == "auto"
    default = _config()
    assert (default.importance, default.taylor_form, default.head_balanced, default.slice_dropout,
            default.calibration_micro_batch_size, default.recompute_slice_inputs) == \
        ("l2", "multivariable", False, 0.0, "auto", None)
    assert default.recomputes_slice_inputs and not _config("--recompute_slice_inputs", "false").recomputes_slice_inputs
    with pytest.raises(SystemExit) as stop:  # the recipe's one-line error (exit 2) from the config's own check
        _config("--taylor_form", "bad", "--importance", "taylor")
    assert stop.value.code == 2 and "Unknown taylor_form 'bad'" in capsys.readouterr().err
