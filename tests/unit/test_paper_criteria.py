"""Criteria and options of the paper's own code (PruFT, github CenjhihLi/sparsity_finetuning): wanda, elementwise
taylor, head-balanced selection and dropout on the slice path, each against a direct dense computation; and the
new config fields' validation (their recipe flags: test_recipe_sparse_flags.py)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import (assert_scores_close, criterion_config as cfg, dense_grads, linears, lm_batches, padded_batches,
                     sparse_trainer, tiny_causal_lm)
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter, save_sparse_adapter
from sprune_trainer.scoring.heads import head_groups
from sprune_trainer.scoring.importance import score_neurons
from sprune_trainer.layers.surgery import inject_slices, sliced_modules
from sprune_trainer.scoring.selection import select_neurons
from sprune_trainer.layers.sliced_linear import SlicedLinear


# ---- wanda ----------------------------------------------------------------------------------------------

def captured_inputs(model, layers, batches):
    """name -> the inputs of every call, (tokens, d_in) over all batches with padding positions dropped."""
    seen = {n: [] for n in layers}
    state = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0][state["keep"]]))
               for n, m in layers.items()]
    with torch.no_grad():
        for b in batches:
            state["keep"] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_wanda_equals_weights_times_input_feature_norms(axis):
    model, batches = tiny_causal_lm("qwen2"), padded_batches()
    layers = linears(model)
    got = score_neurons(model, layers, cfg("wanda", axis=axis), batches, progress=False)
    x = captured_inputs(model, layers, batches)
    want = {}
    for n, m in layers.items():
        metric = m.weight.detach().abs() * x[n].pow(2).sum(0).sqrt()  # (d_out, d_in): |W_ij| ||X_j||
        want[n] = metric.sum(1 if axis == "rows" else 0)
    assert_scores_close(got, want)
    # padding positions are not data: counting them changes the scores
    unmasked = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    with_pads = score_neurons(model, layers, cfg("wanda", axis=axis), unmasked, progress=False)
    q = "model.layers.0.self_attn.q_proj"
    assert (with_pads[q] - got[q]).abs().max() > 1e-3 * got[q].abs().max()


# ---- elementwise taylor ---------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_elementwise_taylor_equals_dense_gradient_computation(axis):
    model, batches = tiny_causal_lm("qwen2"), lm_batches()
    layers = linears(model)
    dim = 1 if axis == "rows" else 0
    grads = dense_grads(model, layers, batches)
    config = cfg("taylor", axis=axis, taylor_form="elementwise", calibration_micro_batch_size=0)
    got = score_neurons(model, layers, config, batches, progress=False)
    want = {n: sum((m.weight.detach() * g[n][0]).abs().sum(dim) for g in grads) for n, m in layers.items()}
    assert_scores_close(got, want)
    multivariable = score_neurons(model, layers, cfg("taylor", axis=axis, calibration_micro_batch_size=0), batches,
                                  progress=False)
    q = "model.layers.0.self_attn.q_proj"
    assert (multivariable[q] < 0.9 * got[q]).any()  # |sum| <= sum |.|, strictly here: the forms differ


# ---- head-balanced selection ----------------------------------------------------------------------------

def test_head_groups_from_the_model_config():
    model = tiny_causal_lm()  # 4 attention heads, 2 key-value heads, head_dim 8
    layers = linears(model)
    rows = head_groups(model, layers, SparseNeuronConfig(neurons_per_layer=4, head_balanced=True))
    assert rows == {f"model.layers.{i}.self_attn.{p}": h for i in range(2) for p, h in
                    (("q_proj", 4), ("k_proj", 2), ("v_proj", 2))}
    cols = head_groups(model, layers, SparseNeuronConfig(neurons_per_layer=4, head_balanced=True, axis="columns"))
    assert cols == {f"model.layers.{i}.self_attn.o_proj": 4 for i in range(2)}
    assert head_groups(model, layers, SparseNeuronConfig(neurons_per_layer=4)) == {}
    mlp_only = {n: m for n, m in layers.items() if ".mlp." in n}
    with pytest.raises(ValueError, match="no targeted layer is an attention projection"):
        head_groups(model, mlp_only, SparseNeuronConfig(neurons_per_layer=4, head_balanced=True))
    model.config.num_attention_heads = 3
    with pytest.raises(ValueError, match="not a multiple of its 3 heads"):
        head_groups(model, layers, SparseNeuronConfig(neurons_per_layer=4, head_balanced=True))


def _top_in_each_head(s, heads, per_head):
    size = len(s) // heads
    out = []
    for h in range(heads):
        block = s[h * size:(h + 1) * size].tolist()
        best = sorted(range(size), key=lambda j: (-block[j], j))[:per_head]
        out += [h * size + j for j in best]
    return sorted(out)


def test_head_balanced_selection_takes_the_same_count_in_every_head():
    g = torch.Generator().manual_seed(0)
    scores = {"q": torch.rand(16, generator=g) * torch.tensor([10.0] * 4 + [1.0] * 12),  # head 0 dominates
              "mlp": torch.rand(16, generator=g)}
    cfg4 = SparseNeuronConfig(neurons_per_layer=8, head_balanced=True)
    sel = select_neurons(scores, cfg4, {"q": 4})
    assert sel["q"].tolist() == _top_in_each_head(scores["q"], 4, 2)
    assert sel["mlp"].tolist() == sorted(torch.topk(scores["mlp"], 8).indices.tolist())  # not grouped
    plain = select_neurons(scores, cfg4)["q"]
    assert (plain < 4).sum() == 4  # without balancing, head 0 takes all it can
    # budgets round half up to a multiple of the heads, never below one per head
    assert select_neurons(scores, SparseNeuronConfig(neurons_per_layer=6), {"q": 4})["q"].numel() == 8
    assert select_neurons(scores, SparseNeuronConfig(neurons_per_layer=5), {"q": 4})["q"].numel() == 4
    assert select_neurons(scores, SparseNeuronConfig(neurons_per_layer=1), {"q": 4})["q"].numel() == 4


def test_head_balanced_global_scope_spreads_each_layers_share_over_its_heads():
    g = torch.Generator().manual_seed(1)
    scores = {"q": torch.rand(16, generator=g), "mlp": torch.rand(16, generator=g)}
    config = SparseNeuronConfig(neurons_per_layer=4, scope="global", head_balanced=True)
    free = select_neurons(scores, config)
    balanced = select_neurons(scores, config, {"q": 2})
    n_q = free["q"].numel()
    assert torch.equal(balanced["mlp"], free["mlp"])
    normed = scores["q"] / scores["q"].mean()
    assert balanced["q"].tolist() == _top_in_each_head(normed, 2, max(1, (2 * n_q + 2) // 4))


def test_trainer_selects_head_balanced_neurons(tmp_path):
    config = SparseNeuronConfig(neurons_per_layer=4, importance="l2", head_balanced=True)
    trainer = sparse_trainer(tmp_path, config)
    trainer.prepare_sparse_model()
    layers = sliced_modules(trainer.model)
    q, k = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.k_proj"]
    assert (q.index // 8).tolist() == [0, 1, 2, 3]  # 4 heads of 8 rows: one each
    assert (k.index // 8).tolist() == [0, 0, 1, 1]  # 2 key-value heads: two each
    with pytest.raises(ValueError, match="no targeted layer is an attention projection"):
        sparse_trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=4, head_balanced=True,
                                                    target_modules=["up_proj"]))


# ---- dropout on the slice path --------------------------------------------------------------------------

def _layer(axis, dropout, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(12, 10)
    index = torch.tensor([1, 4, 7]) if axis == "rows" else torch.tensor([0, 5, 9, 11])
    layer = SlicedLinear(base, index, axis=axis, dropout=dropout)
    with torch.no_grad():
        layer.delta.normal_()
    return layer


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_slice_dropout_drops_the_slice_input_only(axis):
    layer = _layer(axis, 0.5)
    x = torch.randn(3, 5, 12, requires_grad=True)
    gy = torch.randn(3, 5, 10)
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    y.backward(gy)

    x_ref = x.detach().clone().requires_grad_(True)
    delta = layer.delta.detach().clone().requires_grad_(True)
    w, b, idx = layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), layer.index
    torch.manual_seed(7)
    if axis == "rows":
        y_ref = (x_ref @ w.T + b).index_add(-1, idx, F.dropout(x_ref, 0.5) @ delta.T)
    else:
        y_ref = x_ref @ w.T + b + F.dropout(x_ref[..., idx], 0.5) @ delta.T
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(layer.delta.grad, delta.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    plain = _layer(axis, 0.0)
    assert not torch.allclose(y, plain(x))  # dropout was applied

    layer.eval()  # off in eval: exactly the layer without dropout (the fused path)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))


def test_slice_dropout_is_a_config_field_carried_by_saved_adapters(tmp_path):
    model = tiny_causal_lm()
    config = SparseNeuronConfig(neurons_per_layer=2, slice_dropout=0.1)
    selection = select_neurons(score_neurons(model, linears(model), config, progress=False), config)
    inject_slices(model, selection, config)
    assert {m.slice_dropout.p for m in sliced_modules(model).values()} == {0.1}
    save_sparse_adapter(model, str(tmp_path / "a"))
    loaded = load_sparse_adapter(tiny_causal_lm(), str(tmp_path / "a"))
    assert {m.slice_dropout.p for m in sliced_modules(loaded).values()} == {0.1}
    default = inject_slices(tiny_causal_lm(), selection, SparseNeuronConfig(neurons_per_layer=2))
    assert all(m.slice_dropout is None for m in default.values())  # 0: no dropout module, the fused path


# ---- config fields -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(calibration_micro_batch_size=-1), "calibration_micro_batch_size"),
    (dict(calibration_micro_batch_size=1.5), "calibration_micro_batch_size"),
    (dict(calibration_micro_batch_size="fast"), "calibration_micro_batch_size must be 'auto' or an integer"),
    (dict(calibration_micro_batch_size="2"), "calibration_micro_batch_size .*'2'"),
    (dict(taylor_form="sum"), "Unknown taylor_form"),
    (dict(taylor_form="elementwise", importance="hessian"), "importance='taylor' only"),
    (dict(slice_dropout=1.0), r"slice_dropout must be a probability in \[0, 1\)"),
    (dict(slice_dropout=-0.1), "slice_dropout"),
    (dict(importance="wanda", calibration_batches=0), "calibration_batches > 0"),
])
def test_bad_new_fields_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseNeuronConfig(neurons_per_layer=4, **kwargs)
