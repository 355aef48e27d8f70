"""axis='coupled': whole structural neurons (MLP units, attention value and query-key channels) are what is chosen
and trained; checked against the model's own dataflow, the budget, masked dense AdamW, adapters, export and resume."""
import pytest
import torch
from transformers import GPT2Config

from helpers import TokenDataset, masked_dense_training, slice_state, sparse_trainer, tiny_llama_config, tiny_model
from sprune_trainer import SparseNeuronConfig, load_sparse_adapter, merge_sparse, save_sparse_adapter
from sprune_trainer.layers.neuron_groups import neuron_groups, slice_axes
from sprune_trainer.layers.surgery import sliced_modules
from sprune_trainer.layers.targets import find_target_layers
from sprune_trainer.scoring.importance import score_neurons
from sprune_trainer.scoring.selection import coupled_groups, select_neurons

IDS = TokenDataset().ids[:2]


def _coupled(importance="random", k=3, **kw):
    return SparseNeuronConfig(neurons_per_layer=k, importance=importance, axis="coupled", **kw)


def _groups(model):
    return {(g.block, g.kind): g for g in neuron_groups(model, find_target_layers(model))}


def _input_of(module, model):
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    return seen[0]


def test_llama_layers_split_into_mlp_value_and_query_key_groups():
    model = tiny_model()  # 4 heads, 2 key-value heads of 8, intermediate 64
    groups = _groups(model)
    assert sorted(groups) == sorted((f"model.layers.{i}", kind) for i in range(2)
                                    for kind in ("mlp", "value", "query_key"))
    mlp, value, qk = (groups[("model.layers.0", kind)] for kind in ("mlp", "value", "query_key"))
    assert [(m.name.rsplit(".", 1)[1], m.axis) for m in mlp.members] == [
        ("gate_proj", "rows"), ("up_proj", "rows"), ("down_proj", "columns")]
    assert mlp.units == 64 and mlp.cost == 3 * 32
    assert value.units == 16 and value.cost == 32 + 2 * 32  # a v row and the o columns of the 2 heads reading it
    assert value.members[1].index[8 + 3].tolist() == [2 * 8 + 3, 3 * 8 + 3]  # kv head 1, channel 3 -> heads 2, 3
    assert torch.equal(qk.members[1].index, value.members[1].index)  # q rows pair with k rows as o columns with v
    axes = slice_axes(model, find_target_layers(model), "coupled")
    assert {n.rsplit(".", 1)[1]: a for n, a in axes.items() if ".0." in n} == {
        "q_proj": "rows", "k_proj": "rows", "v_proj": "rows", "o_proj": "columns",
        "gate_proj": "rows", "up_proj": "rows", "down_proj": "columns"}


@pytest.mark.parametrize("kind, producer", [("value", "v_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj")])
def test_a_unit_reaches_its_consumer_only_through_its_own_columns(kind, producer):
    """The dataflow the groups claim: changing a unit's producer row changes the consumer's input (o_proj / down_proj)
    exactly in that unit's columns."""
    model = tiny_model()
    group = _groups(model)[("model.layers.1", kind)]
    row_member = next(m for m in group.members if m.name.endswith(producer))
    consumer = next(m for m in group.members if m.axis == "columns")
    layer = model.get_submodule(consumer.name)
    before = _input_of(layer, model)
    unit = 11
    with torch.no_grad():
        model.get_submodule(row_member.name).weight[row_member.index[unit]] += 1.0
    changed = (_input_of(layer, model) - before).abs().amax(dim=(0, 1)) > 1e-6
    assert changed.nonzero().flatten().tolist() == consumer.index[unit].tolist()


@pytest.mark.parametrize("scope", ["per_layer", "global"])
@pytest.mark.parametrize("importance", ["random", "taylor", "zeroth_order", "wanda", "hessian"])
def test_selection_takes_whole_units_within_the_rows_budget(importance, scope):
    model = tiny_model()
    cfg = _coupled(importance, k=3, scope=scope, calibration_batches=2)
    layers = find_target_layers(model)
    groups = coupled_groups(model, layers, cfg)
    batches = [{"input_ids": IDS, "labels": IDS.clone()}] * 2
    scores = score_neurons(model, layers, cfg, batches=batches, progress=False)
    assert all(scores[m.name].numel() == (m.shape[0] if m.axis == "rows" else m.shape[1])
               for g in groups for m in g.members)
    selection = select_neurons(scores, cfg, neuron_groups=groups)
    per_block = 3 * sum(d_in for name, (_, d_in) in _shapes(model).items() if ".0." in name)  # 3 rows per linear
    spent = {}
    for g in groups:  # every member of a unit is chosen with it: the units are read back from any one member
        first = g.members[0]
        units = torch.isin(first.index[:, 0], selection.get(first.name, torch.empty(0, dtype=torch.long)))
        for m in g.members:  # (each linear is a member of one kind)
            got = selection.get(m.name, torch.empty(0, dtype=torch.long))
            assert torch.equal(got, m.index[units].flatten().unique()), m.name
        spent[g.block] = spent.get(g.block, 0) + int(units.sum()) * g.cost
    largest = max(g.cost for g in groups)
    if scope == "per_layer":
        assert all(per_block - largest < s <= per_block for s in spent.values())
    else:
        assert 2 * per_block - largest < sum(spent.values()) <= 2 * per_block


def _shapes(model):
    from sprune_trainer.layers.linear_like import linear_shape
    return {n: linear_shape(m) for n, m in find_target_layers(model).items()}


def test_scores_of_a_unit_add_up_its_members():
    """A unit's score is the sum of its members' (mean-normalised) scores: with l2, a unit whose rows are scaled up
    in every member is chosen first."""
    model = tiny_model()
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj"):
            model.get_submodule(f"model.layers.0.mlp.{proj}").weight[5] *= 50
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 50
    cfg = _coupled("l2", k=1)
    layers = find_target_layers(model)
    selection = select_neurons(score_neurons(model, layers, cfg), cfg, neuron_groups=coupled_groups(model, layers, cfg))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert 5 in selection[f"model.layers.0.mlp.{proj}"].tolist()


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_trainer_steps_equal_masked_dense_training(tmp_path, scope):
    """Rows and columns trained together: 4 full-batch AdamW steps against the dense model with exactly the chosen
    rows of gate/up/q/k/v and columns of down/o trainable."""
    data, steps = TokenDataset(n=8), 4
    cfg = _coupled("taylor", k=3, scope=scope, calibration_batches=2)
    trainer = sparse_trainer(tmp_path, cfg, data, per_device_train_batch_size=8, max_steps=steps)
    trainer.train()
    sliced = sliced_modules(trainer.model)
    assert {m.axis for m in sliced.values()} == {"rows", "columns"}
    selection = {n: m.index.clone() for n, m in sliced.items()}
    axes = {n: m.axis for n, m in sliced.items()}
    ours = merge_sparse(trainer.model).state_dict()
    expected = masked_dense_training(selection, axes, lambda w: torch.optim.AdamW(w, lr=1e-2, weight_decay=0.0,
                                                                                 foreach=False), data, steps)
    original = tiny_model().state_dict()
    moved = 0
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-3, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
        moved += int(not torch.equal(ours[key], original[key]))
    assert moved == len(selection)


def test_adapter_merge_and_peft_export_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = sparse_trainer(tmp_path, _coupled("random", k=3), max_steps=3)
    trainer.train()
    model = trainer.model
    trained = model(IDS).logits.detach()
    save_sparse_adapter(model, tmp_path / "adapter")
    reloaded = load_sparse_adapter(tiny_model(), str(tmp_path / "adapter"))
    assert {n: m.axis for n, m in sliced_modules(reloaded).items()} == {n: m.axis for n, m in sliced_modules(model).items()}
    torch.testing.assert_close(reloaded(IDS).logits, trained, rtol=0, atol=0)
    from sprune_trainer.io.peft_export import export_peft_lora
    export_peft_lora(reloaded, str(tmp_path / "peft"))
    lora = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path / "peft"))
    torch.testing.assert_close(lora(IDS).logits, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge_sparse(model)(IDS).logits, trained, rtol=1e-5, atol=1e-5)


def test_an_adapter_whose_groups_differ_from_the_model_is_refused(tmp_path):
    trainer = sparse_trainer(tmp_path, _coupled("random", k=3), max_steps=1)
    trainer.train()
    save_sparse_adapter(trainer.model, tmp_path / "adapter")
    other = tiny_model(tiny_llama_config(num_key_value_heads=4))  # v/k rows 32 instead of 16
    with pytest.raises(ValueError, match="different model"):
        load_sparse_adapter(other, str(tmp_path / "adapter"))


def test_resume_reaches_the_uninterrupted_slices(tmp_path):
    cfg = _coupled("taylor", k=3, calibration_batches=2)
    full = sparse_trainer(tmp_path / "run", cfg, max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    final = slice_state(full.model)
    resumed = sparse_trainer(tmp_path / "run", cfg, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    after = slice_state(resumed.model)
    assert after.keys() == final.keys()
    assert all(torch.equal(after[n], final[n]) for n in final)


def test_gpt2_couples_its_mlp_and_gives_fused_attention_rows():
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    kinds = {(g.kind, tuple(m.name.rsplit(".", 1)[1] for m in g.members)) for g in neuron_groups(
        model, find_target_layers(model))}
    assert kinds == {("mlp", ("c_fc", "c_proj")), ("rows", ("c_attn",)), ("rows", ("c_proj",))}


@pytest.mark.parametrize("bad, match", [(dict(head_balanced=True), "head_balanced"),
                                        (dict(train_bias=True), "train_bias")])
def test_options_that_do_not_combine_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        _coupled(**bad)


def _fused_models():
    from transformers import MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM
    shape = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, tie_word_embeddings=False)
    return {"phi3": lambda: Phi3ForCausalLM(Phi3Config(**shape, intermediate_size=64, pad_token_id=0)),
            "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**shape, intermediate_size=16, num_local_experts=4,
                                                                num_experts_per_tok=2))}


@pytest.mark.parametrize("family", ["phi3", "mixtral"])
def test_a_fused_gate_up_unit_is_its_two_halves_and_reaches_only_its_down_column(family):
    """Phi-3's gate_up_proj linear and a fused MoE expert's gate_up rows chunk into [gate; up]: unit j is rows j and
    d_ff + j, and changing either moves the down projection's input only in column j (transformers 4.x Mixtral:
    per-expert w1 / w3 / w2 linears, coupled as gate / up / down)."""
    from sprune_trainer.layers.linear_like import linear_weight
    torch.manual_seed(0)
    model = _fused_models()[family]().eval()
    mlps = [g for g in neuron_groups(model, find_target_layers(model)) if g.kind == "mlp"]
    assert len(mlps) == (2 if family == "phi3" else 2 * 4)  # Mixtral: one per expert of each layer
    *producers, consumer = mlps[-1].members
    hidden = consumer.shape[1]
    fused = len(producers) == 1
    assert fused == producers[0].name.endswith("gate_up_proj") and consumer.axis == "columns"
    down = model.get_submodule(consumer.name)
    for producer in producers:
        assert producer.index[5].tolist() == ([5, hidden + 5] if fused else [5])
        for row in producer.index[5].tolist():
            before = _input_of(down, model)
            with torch.no_grad():
                linear_weight(model.get_submodule(producer.name))[row] += 1.0
            changed = (_input_of(down, model) - before).reshape(-1, hidden).abs().amax(0) > 1e-6
            assert changed.nonzero().flatten().tolist() == [5], (producer.name, row)
