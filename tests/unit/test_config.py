import pytest

from sprune_trainer import SparseNeuronConfig


@pytest.mark.parametrize("kwargs, match", [
    (dict(neurons_per_layer=0), "positive integer"),
    (dict(neurons_per_layer=-3), "positive integer"),
    (dict(neurons_per_layer=2.5), "positive integer"),
    (dict(ratio=0.0), r"\(0, 1\]"),
    (dict(ratio=1.5), r"\(0, 1\]"),
    (dict(ratio=-0.1), r"\(0, 1\]"),
    (dict(neurons_per_layer=4, ratio=0.1), "exactly one"),
    (dict(), "exactly one"),
    (dict(neurons_per_layer=4, importance="magnitude"), "Unknown importance"),
    (dict(neurons_per_layer=4, scope="layerwise"), "Unknown scope"),
    (dict(neurons_per_layer=4, axis="cols"), "Unknown axis"),
    (dict(neurons_per_layer=4, optimizer_state="int4"), "Unknown optimizer_state"),
    (dict(neurons_per_layer=4, axis="columns", train_bias=True), "train_bias"),
    (dict(neurons_per_layer=4, importance="taylor", calibration_batches=0), "calibration_batches"),
    (dict(neurons_per_layer=4, target_modules=[]), "target_modules"),
    (dict(neurons_per_layer=4, quantize_base="int4"), "Unknown quantize_base"),
    (dict(neurons_per_layer=4, double_quant=True), "set quantize_base"),
    (dict(neurons_per_layer=4, init_from_quantization_error=True), "set quantize_base='nf4'"),
    # types and ranges, each error naming the field and the value it got
    (dict(neurons_per_layer=4, importance="taylor", calibration_batches=2.5), r"calibration_batches .*2\.5"),
    (dict(neurons_per_layer=4, calibration_batches=-1), r"calibration_batches .*-1"),
    (dict(neurons_per_layer=4, calibration_batches="50"), "calibration_batches .*'50'"),
    (dict(neurons_per_layer="4"), "neurons_per_layer .*'4'"),
    (dict(neurons_per_layer=True), "neurons_per_layer .*True"),
    (dict(ratio="0.1"), "ratio .*'0.1'"),
    (dict(ratio=float("nan")), "ratio .*nan"),
    (dict(neurons_per_layer=4, zo_eps=float("inf")), "zo_eps .*inf"),
    (dict(neurons_per_layer=4, zo_eps="1e-3"), "zo_eps .*'1e-3'"),
    (dict(neurons_per_layer=4, seed=1.5), r"seed .*1\.5"),
    (dict(neurons_per_layer=4, train_bias="yes"), "train_bias .*'yes'"),
    (dict(neurons_per_layer=4, double_quant=1), "double_quant .*1"),
    (dict(neurons_per_layer=4, scope=None), "Unknown scope None"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseNeuronConfig(**kwargs)


def test_round_trip_and_selection_differences():
    a = SparseNeuronConfig(neurons_per_layer=8, importance="taylor", target_modules=("q_proj", "v_proj"))
    b = SparseNeuronConfig.from_dict(a.to_dict())
    assert a == b and a.target_modules == ["q_proj", "v_proj"]
    c = SparseNeuronConfig(neurons_per_layer=16, importance="taylor", optimizer_state="int8",
                           target_modules=["q_proj", "v_proj"])
    assert a.selection_differences(c) == {"neurons_per_layer": (8, 16)}  # storage of moments may change
    with pytest.raises(ValueError, match="Unknown SparseNeuronConfig fields"):
        SparseNeuronConfig.from_dict({**a.to_dict(), "rank": 4})
