"""recompute_slice_inputs: row slices rebuild their inputs in backward from tensors the frozen model keeps anyway.
Outputs and gradients equal today's path bit for bit, and the bytes autograd holds after forward equal the frozen
floor's plus the slices' own few (measured by walking the graph, so this holds on CPU what the GPU peak shows)."""
import warnings

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

from helpers import slice_state, sparse_trainer, tiny_model
from sprune_trainer import SparseNeuronConfig
from benchmarks.measure import set_checkpointing
from benchmarks.saved_bytes import kept_bytes
from sprune_trainer.layers import recompute, sliced_linear
from sprune_trainer.layers.surgery import inject_slices, sliced_modules
from sprune_trainer.layers.targets import find_target_layers

torch.set_num_threads(2)

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {"llama": lambda: LlamaConfig(**SHAPE), "mistral": lambda: MistralConfig(**SHAPE, sliding_window=16),
           "qwen2": lambda: Qwen2Config(**SHAPE), "gemma": lambda: GemmaConfig(**SHAPE, head_dim=8)}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def build(arch, dtype, mode, checkpointing=False):
    """The tiny model in training mode: mode floor (nothing trainable), ours, or ours with recompute."""
    model = tiny_model(CONFIGS[arch](), dtype=dtype)
    model.train()
    model.enable_input_require_grads()  # every layer gets a grad-requiring input, as under checkpointing
    set_checkpointing(model, checkpointing)  # non-reentrant
    for p in model.parameters():
        p.requires_grad_(False)
    if mode != "floor":
        config = SparseNeuronConfig(neurons_per_layer=3, recompute_slice_inputs=mode == "recompute")
        inject_slices(model, {n: torch.tensor([0, 5, 9]) for n in find_target_layers(model)}, config)
        with torch.no_grad():
            for i, layer in enumerate(sliced_modules(model).values()):
                layer.delta.copy_(torch.randn(layer.delta.shape, generator=torch.Generator().manual_seed(i)))
    return model


def run(arch, dtype, mode, checkpointing=False, autocast=False):
    """One training step's forward and backward (autocast: bf16, as Trainer(bf16=True) on an fp32 model)."""
    model = build(arch, dtype, mode, checkpointing)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=IDS, labels=IDS)
    kept = None if checkpointing else kept_bytes(out.loss, model)  # (reading checkpointed saves would recompute)
    out.loss.backward()
    grads = {n: layer.delta.grad for n, layer in sliced_modules(model).items()}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads, "kept": kept, "model": model}


def slice_bytes(model, compute_dtype=None) -> int:
    """What the slices themselves add to the saved set: their index buffers and compute-dtype copies of delta."""
    total = 0
    for layer in sliced_modules(model).values():
        dtype = compute_dtype or layer.base_layer.weight.dtype
        total += layer.index.numel() * layer.index.element_size()
        if layer.delta.dtype != dtype:
            total += layer.delta.numel() * dtype.itemsize
    return total


def assert_same_step(a, b):
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])
    assert a["grads"].keys() == b["grads"].keys()
    assert all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_family_rebuilds_every_input_bit_exactly_at_the_floors_memory(arch, dtype):
    floor, ours, rebuilt = (run(arch, dtype, mode) for mode in ("floor", "ours", "recompute"))
    assert_same_step(ours, rebuilt)
    assert all(g.abs().sum() > 0 for g in rebuilt["grads"].values())
    assert rebuilt["kept"] == floor["kept"] + slice_bytes(rebuilt["model"])
    assert ours["kept"] > rebuilt["kept"] + 0.1 * floor["kept"]  # what today's path saves on top


def test_fp32_model_under_bf16_autocast():
    """The norm's output is fp32 there and each slice casts it to bf16: today's path saves one cast per slice (q, k
    and v: three), the rebuild includes the cast and saves none. (The floor is no reference here: autocast's linear
    saves a bf16 copy of every frozen weight, which the fused slices recast in backward instead.)"""
    ours, rebuilt = run("llama", torch.float32, "ours", autocast=True), run("llama", torch.float32, "recompute",
                                                                            autocast=True)
    assert_same_step(ours, rebuilt)
    casts = sum(IDS.numel() * layer.in_features * 2 for name, layer in sliced_modules(rebuilt["model"]).items()
                if not name.endswith("o_proj"))  # o_proj's input: a view of SDPA's saved output in both
    assert ours["kept"] - rebuilt["kept"] == casts


def test_attention_output_is_already_free():
    """o_proj's input is a view of the output SDPA saves for its own backward: saving it costs nothing."""
    model = tiny_model(CONFIGS["llama"]())
    model.train()
    model.enable_input_require_grads()
    seen = {}
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    model(input_ids=IDS)
    x, node = seen["x"], seen["x"].grad_fn
    while node is not None and not hasattr(node, "_saved_output"):
        node = node.next_functions[0][0]
    assert node is not None and node._saved_output.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_other_structures_keep_todays_path_where_they_differ():
    """Gemma's norm is (1 + w) * norm(x.float()) cast back: not Llama's, so q/k/v/gate/up save their input; its
    gated MLP has the same act(gate) * up, which is rebuilt."""
    ours, rebuilt = run("gemma", torch.float32, "ours"), run("gemma", torch.float32, "recompute")
    assert_same_step(ours, rebuilt)
    floor = run("gemma", torch.float32, "floor")
    assert floor["kept"] + slice_bytes(rebuilt["model"]) < rebuilt["kept"] < ours["kept"]


def test_activation_checkpointing_keeps_todays_path(monkeypatch):
    """Checkpointing owns what is saved (saved-tensor hooks): no rebuild is set up, in forward nor in recompute."""
    found = []
    monkeypatch.setattr(sliced_linear, "input_source", lambda x: found.append(recompute.input_source(x)))
    ours, rebuilt = run("llama", torch.float32, "ours", True), run("llama", torch.float32, "recompute", True)
    assert_same_step(ours, rebuilt)
    assert len(found) == 2 * 14 and not any(found)  # 14 slices, forward + recompute in backward


def test_a_rebuild_that_is_not_exact_falls_back_with_a_warning(monkeypatch):
    original = recompute._product_source

    def off_by_one(x):
        found = original(x)
        return None if found is None else ((lambda a, b: a * b + 1), found[1])

    monkeypatch.setattr(recompute, "_product_source", off_by_one)
    ours = run("llama", torch.float32, "ours")
    with pytest.warns(RuntimeWarning, match="saves its input instead"):
        rebuilt = run("llama", torch.float32, "recompute")
    assert_same_step(ours, rebuilt)
    down = rebuilt["model"].model.layers[0].mlp.down_proj
    assert not down.recompute_input and rebuilt["model"].model.layers[0].self_attn.q_proj.recompute_input


def test_rebuild_is_on_by_default_for_rows_only():
    assert SparseNeuronConfig(neurons_per_layer=2).recomputes_slice_inputs
    assert not SparseNeuronConfig(neurons_per_layer=2, axis="columns").recomputes_slice_inputs
    assert SparseNeuronConfig(neurons_per_layer=2, axis="coupled").recomputes_slice_inputs  # its row slices
    assert not SparseNeuronConfig(neurons_per_layer=2, recompute_slice_inputs=False).recomputes_slice_inputs
    with pytest.raises(ValueError, match="recompute_slice_inputs must be True, False or None"):
        SparseNeuronConfig(neurons_per_layer=2, recompute_slice_inputs="yes")
    with pytest.raises(ValueError, match="recompute_slice_inputs applies to row slices"):
        SparseNeuronConfig(neurons_per_layer=2, axis="columns", recompute_slice_inputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the supported structures
        run("qwen2", torch.bfloat16, "recompute")


def test_each_input_is_rebuilt_once_for_all_slices_reading_it(monkeypatch):
    """q/k/v share one rebuild of their norm's output, gate/up another, down_proj its own: 3 per decoder layer."""
    in_backward, calls = [], []
    for name in ("_product_source", "_rms_norm_source"):
        def counting(x, original=getattr(recompute, name), name=name):
            found = original(x)
            if found is None:
                return None
            fn, tensors = found

            def counted(*t):
                if in_backward:
                    calls.append(name)
                return fn(*t)
            return counted, tensors
        monkeypatch.setattr(recompute, name, counting)
    model = build("llama", torch.bfloat16, "recompute")
    loss = model(input_ids=IDS, labels=IDS).loss
    in_backward.append(True)
    loss.backward()
    assert sorted(calls) == ["_product_source"] * 2 + ["_rms_norm_source"] * 4


def test_trainer_steps_are_identical_with_recompute(tmp_path):
    states = []
    for recompute_inputs in (False, True):
        config = SparseNeuronConfig(neurons_per_layer=4, importance="l2", recompute_slice_inputs=recompute_inputs)
        trainer = sparse_trainer(tmp_path / str(recompute_inputs), config, max_steps=3)
        trainer.train()
        assert all(m.recompute_input == recompute_inputs for m in sliced_modules(trainer.model).values())
        states.append(slice_state(trainer.model))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
    assert any(states[1][n].abs().sum() > 0 for n in states[1])
