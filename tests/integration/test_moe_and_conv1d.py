"""MoE experts and GPT-2's Conv1D are sliced like any linear, checked against the dense model they come from:
fused 3-D experts (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert, OLMoE in transformers 5.x; per-expert
nn.Linear in 4.x), an MoE built from per-expert nn.Linear modules, and GPT-2. Only the chosen rows change, the slices' gradients are the dense weight gradient's rows,
N Trainer steps equal masked dense training (also when an expert gets no token), adapters and merges reproduce the
trained logits, and routers are never sliced."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, \
    MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, \
    Qwen3MoeForCausalLM, TrainerCallback

from helpers import TokenDataset, dense_mask, masked_dense_training, random_selection, sparse_trainer
from sprune_trainer import SparseNeuronConfig, load_sparse_adapter, merge_sparse, save_sparse_adapter
from sprune_trainer.layers.grouped_experts import grouped_slices
from sprune_trainer.layers.surgery import inject_slices, sliced_modules
from sprune_trainer.layers.targets import find_target_layers, routers

SHAPE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False)


class TinyMoE(nn.Module):
    """A top-2 MoE block of per-expert nn.Linear MLPs with an nn.Linear router (the transformers 4.x layout)."""

    def __init__(self, d=32, d_ff=16, n_experts=4):
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict(dict(gate_proj=nn.Linear(d, d_ff, bias=False),
                                                        up_proj=nn.Linear(d, d_ff, bias=False),
                                                        down_proj=nn.Linear(d_ff, d, bias=False)))
                                     for _ in range(n_experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), 2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                h = nn.functional.silu(expert["gate_proj"](flat[token])) * expert["up_proj"](flat[token])
                out.index_add_(0, token, expert["down_proj"](h) * weights[token, slot, None])
        return out.reshape(x.shape)


def _per_expert_linear_moe():
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, intermediate_size=64))
    for layer in model.model.layers:
        layer.mlp = TinyMoE()
    return model


def _eager_experts(model):
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


FAMILIES = {
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**SHAPE, intermediate_size=16, num_local_experts=4,
                                                        num_experts_per_tok=2)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE, intermediate_size=64, moe_intermediate_size=16,
                                                            num_experts=4, num_experts_per_tok=2, head_dim=8)),
    # the same Mixtral on transformers' eager experts loop (5.x; the default is grouped_mm where it can run)
    "mixtral_eager": lambda: _eager_experts(FAMILIES["mixtral"]()),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**SHAPE, intermediate_size=64, moe_intermediate_size=16,
                                                            shared_expert_intermediate_size=32, num_experts=4,
                                                            num_experts_per_tok=2)),  # and a gated shared expert
    "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(**SHAPE, intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "linear_experts": _per_expert_linear_moe,
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                                      embd_pdrop=0.0, attn_pdrop=0.0)),
}


def _model(family, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _expert_layers(model):
    return [n for n in find_target_layers(model) if ".experts." in n]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "linear_experts"])
def test_every_expert_projection_is_targeted_and_routers_are_not(family):
    model = _model(family)
    found = find_target_layers(model)
    experts = _expert_layers(model)
    per_expert = 2 if any(n.endswith("gate_up_proj") for n in experts) else 3  # fused gate/up (5.x) or apart
    assert len(experts) == 2 * 4 * per_expert
    assert not set(routers(model)) & set(found)
    for name in routers(model):
        with pytest.raises(ValueError, match="MoE router.*modules_to_save"):
            find_target_layers(model, [name])


def test_gpt2_conv1d_projections_are_targeted():
    model = _model("gpt2")
    names = sorted({n.rsplit(".", 1)[-1] for n in find_target_layers(model)})
    assert names == ["c_attn", "c_fc", "c_proj"]


def _random_selection(model, axis, k=3, seed=0):
    return random_selection(model, SparseNeuronConfig(neurons_per_layer=k, importance="random", axis=axis), seed)


@pytest.mark.parametrize("axis", ["rows", "columns"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_slice_grads_are_the_dense_weight_grads_rows(family, axis):
    batch = {"input_ids": TokenDataset(n=4).ids, "labels": TokenDataset(n=4).ids}
    dense = _model(family)
    sliced = _model(family)
    selection = _random_selection(sliced, axis)
    inject_slices(sliced, selection, SparseNeuronConfig(neurons_per_layer=3, importance="random", axis=axis))
    with torch.no_grad():  # the slices start at zero: both models compute the same function
        torch.testing.assert_close(sliced(**batch).logits, dense(**batch).logits, rtol=0, atol=1e-6)
    sliced(**batch).loss.backward()
    weights = {}
    for name, idx in selection.items():
        w, mask = dense_mask(dense, name, idx, axis)
        weights[name] = (w, mask)
        w.requires_grad_(True)
    dense(**batch).loss.backward()
    for name, idx in selection.items():
        w, mask = weights[name]
        layer = sliced.get_submodule(name)
        grad = w.grad
        if type(layer.base_layer).__name__ == "Conv1D":  # stored (d_in, d_out)
            grad, mask = grad.T, mask.T
        want = grad[mask].reshape(layer.delta.shape)  # W[I] (k, d_in) or W[:, J] (d_out, k), row-major either way
        torch.testing.assert_close(layer.delta.grad, want, rtol=1e-4, atol=1e-7, msg=name)


class _StarveExpert(TrainerCallback):
    """Routes no token to expert 3 on odd steps (`starve[0]` read by the router patch); records, per step, whether it
    was starved and the gradients its slices had before the optimizer step."""

    def __init__(self, starve):
        self.starve, self.grads = starve, []

    def on_step_begin(self, args, state, control, **kw):
        self.starve[0] = state.global_step % 2 == 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        slices = [m.delta for n, m in sliced_modules(model).items() if ".experts.3." in n]
        self.grads.append((self.starve[0], [None if d.grad is None else d.grad.clone() for d in slices]))


def _starvable(model, starve):
    """Mixtral whose routers give expert 3 no token while `starve[0]` is set (5.x: a top-k router module; 4.x: the
    block takes top-k of an nn.Linear's logits)."""
    for block in model.modules():
        if not hasattr(block, "experts"):
            continue
        router, original = block.gate, block.gate.forward

        def forward(h, original=original, linear=isinstance(block.gate, nn.Linear)):
            logits = original(h) if linear else original(h)[0]
            if starve[0]:
                logits = logits.clone()
                logits[:, 3] = float("-inf")
            if linear:
                return logits
            top, idx = torch.topk(logits.float().softmax(-1), 2, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx
        router.forward = forward
    return model


def _covered(model, selection, axis):
    """state-dict key -> mask of the entries the slices cover, in `model` (unsliced or merged)."""
    keys = {v.data_ptr(): k for k, v in model.state_dict().items()}
    covered = {}
    for name, idx in selection.items():
        w, mask = dense_mask(model, name, idx, axis)
        key = keys[w.data_ptr()]
        covered[key] = covered[key] | mask if key in covered else mask
    return covered


@pytest.mark.parametrize("family,axis", [("mixtral", "rows"), ("mixtral", "columns"), ("mixtral_eager", "rows"),
                                         ("mixtral_eager", "columns"), ("qwen3_moe", "rows"),
                                         ("linear_experts", "rows"), ("gpt2", "rows"), ("gpt2", "columns")])
def test_trainer_steps_equal_masked_dense_training(tmp_path, family, axis):
    """Full-batch AdamW steps (batch = dataset) against the dense model with only the selected entries trainable; for
    Mixtral, expert 3 gets no token on odd steps: its slices get zero gradients, as its dense rows do. Tolerance: a
    tenth of one lr step, as Adam divides float-order noise in near-zero gradients by their own tiny sqrt(v)."""
    data, steps = TokenDataset(n=8), 4
    starve = [False]
    mixtral = family.startswith("mixtral")
    make = (lambda: _starvable(_model(family), starve)) if mixtral else (lambda: _model(family))
    cfg = SparseNeuronConfig(neurons_per_layer=3, importance="l2", axis=axis)
    trainer = sparse_trainer(tmp_path, cfg, data, model=make(), per_device_train_batch_size=8, max_steps=steps)
    starving = _StarveExpert(starve)
    trainer.add_callback(starving)
    trainer.train()
    selection = {n: m.index.clone() for n, m in sliced_modules(trainer.model).items()}
    assert any(".experts." in n for n in selection) or family == "gpt2"
    if mixtral:
        fused = any(n.endswith("gate_up_proj") for n in selection)
        experts = trainer.model.model.layers[0].mlp.experts if fused else None
        if fused:  # the path the model asked for: grouped matmuls, or transformers' eager loop
            assert (grouped_slices(experts, ("gate_up_proj", "down_proj")) is not None) == (family == "mixtral")
        assert [s for s, _ in starving.grads] == [False, True, False, True]
        for starved, grads in starving.grads:
            if not starved:
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
            elif fused:  # zeros, as the dense fused rows get
                assert all(g is not None and not g.any() for g in grads)
            else:  # 4.x: the expert's nn.Linear is not called, so neither it nor its dense twin gets a gradient
                assert all(g is None for g in grads)
    ours = merge_sparse(trainer.model).state_dict()

    def before_step(i):
        starve[0] = i % 2 == 1
    expected = masked_dense_training(selection, axis, lambda w: torch.optim.AdamW(w, lr=1e-2, weight_decay=0.0,
                                                                                 foreach=False),
                                     data, steps, make_model=make, before_step=before_step)
    original = make()
    covered = _covered(original, selection, axis)
    original = original.state_dict()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-3, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
        assert torch.equal(ours[key], original[key]) == (key not in covered), key  # every sliced weight moved


def test_sliced_experts_change_only_chosen_rows_and_round_trip(tmp_path):
    model = _model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = sparse_trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=3, importance="taylor",
                                                          calibration_batches=2), model=model, max_steps=3)
    trainer.train()
    ids = TokenDataset().ids[:2]
    trained = model(ids).logits.detach()
    save_sparse_adapter(model, tmp_path / "adapter")
    reloaded = load_sparse_adapter(_model("qwen3_moe"), str(tmp_path / "adapter"))
    torch.testing.assert_close(reloaded(ids).logits, trained, rtol=0, atol=0)
    selection = {n: m.index.clone() for n, m in sliced_modules(model).items()}
    merged = merge_sparse(model)
    torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-5, atol=1e-5)
    after = merged.state_dict()
    assert list(after) == list(before)  # the experts module is back to its own parameters and names
    covered = _covered(merged, selection, "rows")
    assert any(".experts." in k for k in covered)
    for key, value in after.items():
        changed = value != before[key]
        if key in covered:
            assert changed.any() and not (changed & ~covered[key]).any(), key  # only the chosen rows moved
        else:
            assert not changed.any(), key


def test_across_experts_scope_shares_one_budget_per_projection(tmp_path):
    model = _model("mixtral")
    cfg = SparseNeuronConfig(neurons_per_layer=3, importance="taylor", calibration_batches=2,
                             expert_scope="across_experts")
    trainer = sparse_trainer(tmp_path, cfg, model=model, max_steps=1)
    trainer.train()
    counts = {}  # "<...>.experts.<projection>" -> neurons per sliced expert
    for name, layer in sliced_modules(model).items():
        if ".experts." in name:
            head, expert, projection = name.rsplit(".", 2)
            counts.setdefault(f"{head}.{projection}", []).append(layer.index.numel())
    projections = 2 if any(g.endswith("gate_up_proj") for g in counts) else 3  # fused gate/up (5.x) or apart
    assert len(counts) == 2 * projections and all(sum(c) == 3 * 4 for c in counts.values())  # 4 budgets, shared
    assert any(len(c) < 4 or len(set(c)) > 1 for c in counts.values())  # spent where the scores are


def test_quantize_base_refuses_expert_and_conv1d_bases():
    """Fused experts and Conv1D (4.x experts are nn.Linear modules, which quantize like any)."""
    fused = any(n.endswith("gate_up_proj") for n in _expert_layers(_model("mixtral")))
    for family in ("mixtral", "gpt2") if fused else ("gpt2",):
        with pytest.raises(ValueError, match="stay in full precision"):
            inject_slices(_model(family), {}, SparseNeuronConfig(neurons_per_layer=3, quantize_base="nf4"))


def test_unknown_expert_layout_is_left_frozen_and_named(caplog):
    """An experts module whose own forward is not the per-expert loop this code runs: never sliced, and said so."""
    import logging
    model = _model("mixtral")
    if not hasattr(model.model.layers[0], "mlp"):
        pytest.skip("transformers 4.x: Mixtral's experts are nn.Linear modules (block_sparse_moe), no fused layout")
    experts_cls = type(model.model.layers[0].mlp.experts)
    odd = type("OddExperts", (experts_cls,), {"forward": lambda self, h, i, w: 2 * experts_cls.forward(self, h, i, w)})
    for layer in model.model.layers:
        layer.mlp.experts.__class__ = odd
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        names = find_target_layers(model)
    assert not [n for n in names if ".experts." in n]
    assert "OddExperts's per-expert computation is not the layout this code knows" in caplog.text


def test_nonfinite_step_is_skipped_with_expert_slices(tmp_path):
    """The non-finite guard over expert slices as over any: the poisoned step is skipped, every slice stays finite."""
    from helpers import inject_nonfinite
    model = _model("mixtral")
    trainer = sparse_trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=3, importance="l2"), model=model,
                             max_steps=4)
    inject_nonfinite(trainer.model, trainer, steps={2})
    trainer.train()
    assert trainer.nonfinite.skipped_steps == [2]
    experts = [m.delta for n, m in sliced_modules(model).items() if ".experts." in n]
    assert experts and all(torch.isfinite(d).all() for d in experts) and any(d.any() for d in experts)


def test_a_router_trains_only_through_modules_to_save(tmp_path):
    model = _model("mixtral")
    routers_before = {n: m.weight.detach().clone() for n, m in routers_and_gates(model).items()}
    cfg = SparseNeuronConfig(neurons_per_layer=3, importance="l2", modules_to_save=list(routers_before))
    sparse_trainer(tmp_path, cfg, model=model, max_steps=2).train()
    for name, before in routers_before.items():
        router = model.get_submodule(name)
        assert router.weight.requires_grad and not torch.equal(router.weight, before), name
        assert name not in sliced_modules(model)


def routers_and_gates(model):
    """The routing module of every MoE block (5.x: a top-k router module; 4.x: an nn.Linear `gate`)."""
    return {n: m for n, m in model.named_modules() if n.endswith(("mlp.gate", "block_sparse_moe.gate"))}


@pytest.mark.slow
def test_compiled_training_of_expert_slices_equals_eager(tmp_path):
    """torch_compile=True (aot_eager on the CPU) over the experts' grouped path and Conv1D: the same slices as eager."""
    from helpers import slice_state
    for family in ("mixtral", "gpt2"):
        states = []
        for compiled in (False, True):
            kw = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
            trainer = sparse_trainer(tmp_path / f"{family}{compiled}", SparseNeuronConfig(neurons_per_layer=3,
                                     importance="l2"), model=_model(family), max_steps=3, **kw)
            trainer.train()
            states.append({k.replace("_orig_mod.", ""): v for k, v in slice_state(trainer.model).items()})
        eager, compiled = states
        assert eager.keys() == compiled.keys() and any(".experts." in k for k in eager) == (family == "mixtral")
        for key, value in eager.items():
            assert value.any(), key
            torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_expert_slices_take_the_models_mode(mode):
    """Expert views made in a model in eval mode (an adapter loaded for inference) are in eval mode too, so the
    slices surgery puts on them apply no slice dropout until the model is set to train."""
    model = _model("mixtral").train(mode == "train")
    cfg = SparseNeuronConfig(neurons_per_layer=3, importance="random", slice_dropout=0.5)
    inject_slices(model, _random_selection(model, "rows"), cfg)
    experts = [m for n, m in sliced_modules(model).items() if ".experts." in n]
    assert experts and all(m.training == (mode == "train") for m in experts)
    assert all(m.training == (mode == "train") for m in model.modules())
    if mode == "eval":
        batch = TokenDataset(n=2).ids
        with torch.no_grad():
            assert torch.equal(model(batch).logits, model(batch).logits)  # no dropout draws
