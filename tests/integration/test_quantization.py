"""Slices over bitsandbytes 4-bit / 8-bit bases on the CPU: forward and gradient against the dequantized dense
reference, low-quantization-error init, merge (dense and re-quantized), the Trainer and its clear errors.

bitsandbytes >= 0.45 runs quantize/dequantize, Linear4bit (nf4/fp4) and Linear8bitLt forward+backward on the CPU
(checked with 0.50.2); where an install cannot, the probe (helpers.bnb_cpu_support) skips with the error it got.
On an AVX512-BF16 CPU an eval forward without grad repacks the 4-bit codes of a layer transformers loaded for a packed
bf16 kernel, which needs the layer widths of helpers.QUANTIZABLE_WIDTHS (the 32-wide tiny model fails there), so the
4-bit tests' models use them; the layers quantize_base makes keep the training kernel (exact reloads)."""
import sys
import warnings

import pytest
import torch
from torch import nn

from helpers import (TokenDataset, needs_bnb, random_batches, tiny_model, tiny_quantizable_llama_config,
                     with_bnb_inference_kernel)
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter, merge_sparse, save_sparse_adapter
from sprune_trainer.layers.surgery import quantize_with_sparse_correction, sliced_modules
from sprune_trainer.layers.quantization import (bnb_kind, check_zero3_quant_storage, dequantize_weight,
                                                quantize_4bit, quantize_8bit)
from sprune_trainer.scoring.importance import score_neurons
from sprune_trainer.layers.sliced_linear import SlicedLinear
from sprune_trainer.training.summary import selection_summary

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'sprune_trainer[bnb]')")
warnings.filterwarnings("ignore", message="MatMul8bitLt")  # fp32 inputs are cast to fp16: expected on 8-bit bases
needs_4bit, needs_8bit = needs_bnb("4bit"), needs_bnb("8bit")  # skip with bitsandbytes' error where it cannot run
# on a GPU machine the same tests run on cuda too (the lead's GPU check); no skip noise on a CPU-only one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_quantizable(**kw):
    """The tiny Llama at widths bitsandbytes' packed CPU 4-bit inference takes (helpers.QUANTIZABLE_WIDTHS), so an
    eval forward on an AVX512-BF16 CPU runs that path instead of failing on a 32-wide layer."""
    return tiny_model(tiny_quantizable_llama_config(), **kw)


def _packs_4bit(device) -> bool:
    """Whether an eval forward without grad repacks 4-bit codes for bitsandbytes' packed CPU kernel."""
    has_avx512bf16 = getattr(bnb.functional, "has_avx512bf16", lambda: False)  # absent: no packed path
    return device == "cpu" and bool(has_avx512bf16())


def _packed(layer) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))  # 4-bit only


def _quantized(kind, weight, bias, device="cpu", **kw):
    weight, bias = weight.to(device), None if bias is None else bias.to(device)
    return quantize_4bit(weight, bias, **kw) if kind.startswith("4bit") else quantize_8bit(weight, bias)


def _tol(kind, device):
    if kind.startswith("8bit"):  # fp16 activations on the CPU; int8 activations (LLM.int8) on a GPU
        return 2e-2 if device == "cpu" else 6e-2
    return 1e-5 if device == "cpu" else 1e-4


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_quantizable().save_pretrained(path)
    return str(path)


def _load(path, kind, device="cpu"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
          if kind == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map={"": device},
                                                dtype=torch.float32).eval()


def _args(out, device="cpu", **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to="none",
                save_strategy="no", disable_tqdm=True, use_cpu=device == "cpu", seed=3, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


# ---- the layer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, kw", [
    pytest.param("4bit-nf4", dict(quant_type="nf4"), marks=needs_4bit),
    pytest.param("4bit-fp4", dict(quant_type="fp4", double_quant=True), marks=needs_4bit),
    pytest.param("8bit", {}, marks=needs_8bit),
])
@pytest.mark.parametrize("axis", ["rows", "columns"])
@pytest.mark.parametrize("device", DEVICES)
def test_slice_over_quantized_base_matches_dequantized_reference(kind, kw, axis, device):
    torch.manual_seed(0)
    dense = nn.Linear(64, 32).to(device)
    base = _quantized(kind, dense.weight.detach(), dense.bias.detach(), device, **kw)
    packed = base.weight.data.clone()
    layer = SlicedLinear(base, torch.tensor([3, 17, 30]), axis=axis)
    with torch.no_grad():
        layer.delta.normal_(std=0.05)
    x = torch.randn(2, 5, 64, device=device)
    w_hat = layer.merged_weight(dequantize_weight(base))  # dequant(Q(W)) + delta on the slice, fp32
    reference = (x @ w_hat.T + dense.bias).detach()
    tol = _tol(kind, device)
    torch.testing.assert_close(layer(x), reference, rtol=tol, atol=tol)

    target = torch.randn(2, 5, 32, device=device)
    ((layer(x) - target) ** 2).sum().backward()
    w = w_hat.clone().requires_grad_(True)
    ((x @ w.T + dense.bias.detach() - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.delta.grad, layer.select(w.grad), rtol=tol, atol=tol * 10)
    assert torch.equal(base.weight.data, packed)  # the base stays quantized and untouched


# ---- low-quantization-error init ----------------------------------------------------------------------------
@needs_4bit
@pytest.mark.parametrize("axis, dtype", [("rows", torch.float32), ("rows", torch.bfloat16), ("columns", torch.float32)])
@pytest.mark.parametrize("device", DEVICES)
def test_residual_init_reproduces_selected_rows_exactly(axis, dtype, device):
    original = tiny_quantizable(dtype=dtype).to(device)
    model = tiny_quantizable(dtype=dtype).to(device)
    cfg = SparseNeuronConfig(neurons_per_layer=6, importance="l2", axis=axis)
    quantize_with_sparse_correction(model, cfg)
    layers = sliced_modules(model)
    assert len(layers) == 14 and all(bnb_kind(m.base_layer) == "4bit" for m in layers.values())
    for name, layer in layers.items():
        w = original.get_submodule(name).weight.detach().float()
        q = dequantize_weight(layer.base_layer)
        w_hat = layer.merged_weight(q)
        # Q(W)[I] + delta == W[I]: the fp32 sum of a float and its exact fp32 residual (1 ulp at most)
        torch.testing.assert_close(layer.select(w_hat), layer.select(w), rtol=1.2e-7, atol=0)
        rest = torch.ones(w.shape[layer._dim], dtype=torch.bool, device=device)
        rest[layer.index] = False
        assert torch.equal(w_hat[rest] if axis == "rows" else w_hat[:, rest], q[rest] if axis == "rows" else q[:, rest])
        assert (w - w_hat).norm() < (w - q).norm()  # strictly better than QLoRA's Q(W)
    # and the model: logits closer to the full-precision ones than the plain 4-bit base
    plain = tiny_quantizable(dtype=dtype).to(device)
    quantize_with_sparse_correction(plain, cfg)
    for layer in sliced_modules(plain).values():
        layer.delta.data.zero_()
    ids = random_batches(1)[0]["input_ids"].to(device)
    with torch.no_grad():
        ref, ours, qlora = (m(input_ids=ids).logits.float() for m in (original, model, plain))
    assert (ours - ref).norm() < (qlora - ref).norm()


@needs_4bit
def test_low_error_init_needs_full_precision_weights(saved_tiny, tmp_path):
    quantized = _load(saved_tiny, "4bit")
    cfg = SparseNeuronConfig(neurons_per_layer=4, quantize_base="nf4", init_from_quantization_error=True)
    with pytest.raises(ValueError, match="needs the full-precision weights.*q_proj.*4bit.*Load the model in full"):
        quantize_with_sparse_correction(quantized, cfg)
    with pytest.raises(ValueError, match="needs the full-precision weights"):  # at Trainer(), before any training
        SparseNeuronTrainer(model=quantized, args=_args(tmp_path), train_dataset=TokenDataset(), sparse_config=cfg)
    with pytest.raises(ValueError, match="scores on data"):
        quantize_with_sparse_correction(tiny_model(), SparseNeuronConfig(neurons_per_layer=4, importance="taylor"))


# ---- Trainer --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [pytest.param("4bit", marks=needs_4bit), pytest.param("8bit", marks=needs_8bit)])
@pytest.mark.parametrize("device", DEVICES)
def test_trainer_trains_a_bitsandbytes_model_and_merges_it(saved_tiny, tmp_path, kind, device):
    from transformers import Trainer
    model = _load(saved_tiny, kind, device)
    with pytest.raises(ValueError, match="purely quantized"):  # what SparseNeuronTrainer has to get past
        Trainer(model=model, args=_args(tmp_path, device))
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if bnb_kind(m)}
    trainer = SparseNeuronTrainer(model=model, args=_args(tmp_path, device), train_dataset=TokenDataset(),
                                  sparse_config=SparseNeuronConfig(neurons_per_layer=4, importance="taylor",
                                                                   calibration_batches=2))
    assert model._hf_peft_config_loaded is False  # raised only while Trainer.__init__ ran
    trainer.train()
    layers = sliced_modules(model)
    assert len(layers) == 14 and all(layer.delta.abs().sum() > 0 for layer in layers.values())
    assert all(torch.equal(layers[n].base_layer.weight.data, w) for n, w in packed.items())
    trainer.save_model(str(tmp_path / "adapter"))

    ids = random_batches(1)[0]["input_ids"].to(device)
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits  # evaluate, then merge: the merge reads repacked codes back
        packed = any(_packed(layer.base_layer) for layer in layers.values())
        merge_sparse(model)
        after = model(input_ids=ids).logits
    assert packed == (kind == "4bit" and _packs_4bit(device))
    assert not any(bnb_kind(m) for m in model.modules()) and not sliced_modules(model)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()  # save_pretrained writes a plain model
    # logits after two layers; the packed kernel computes in bf16 (2e-3 off here, the slices move the logits by 0.2)
    tol = 1e-2 if packed else 10 * _tol(kind, device)
    torch.testing.assert_close(after, before, rtol=tol, atol=tol)


@needs_4bit
@pytest.mark.parametrize("device", DEVICES)
def test_trainer_quantizes_a_full_precision_model_and_the_adapter_reloads(tmp_path, saved_tiny, device):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2, quantize_base="nf4",
                             init_from_quantization_error=True)
    model = tiny_quantizable()
    trainer = SparseNeuronTrainer(model=model, args=_args(tmp_path, device), train_dataset=TokenDataset(),
                                  sparse_config=cfg)
    trainer.train()
    assert all(bnb_kind(m.base_layer) == "4bit" for m in sliced_modules(model).values())
    assert not any(isinstance(m, nn.Linear) and not bnb_kind(m) for n, m in model.named_modules()
                   if n.endswith("_proj"))  # every targeted linear is 4-bit, QLoRA-style
    save_sparse_adapter(model, str(tmp_path / "adapter"))
    ids = random_batches(1)[0]["input_ids"].to(device)
    # full precision in, quantized the same way, the trained slices on top
    reloaded = load_sparse_adapter(tiny_quantizable().to(device), str(tmp_path / "adapter"))
    assert not reloaded.training and model.training  # a fresh base is in eval mode, the trained model is not
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=0)
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, trained, rtol=0, atol=0)
    for name, layer in sliced_modules(reloaded).items():  # the same packed codes, never repacked for inference
        assert not _packed(layer.base_layer), name
        assert torch.equal(layer.base_layer.weight.data.view(torch.uint8),
                           model.get_submodule(name).base_layer.weight.data.view(torch.uint8)), name
    with pytest.raises(ValueError, match="needs the full-precision weights"):
        load_sparse_adapter(_load(saved_tiny, "4bit"), str(tmp_path / "adapter"))


# ---- scoring and summary -------------------------------------------------------------------------------------
@needs_8bit
@pytest.mark.parametrize("importance", ["l1", "l2"])
@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_norm_scores_of_an_8bit_layer_are_those_of_its_dequantized_weight(importance, axis):
    """The first forward moves the per-row scales from `weight.SCB` to `layer.state`; int8 codes must not be
    scored as if they were weights."""
    torch.manual_seed(0)
    layer = quantize_8bit(torch.randn(24, 40), torch.randn(24))
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance=importance, axis=axis)
    p, dim = (1 if importance == "l1" else 2), (1 if axis == "rows" else 0)
    dense = dequantize_weight(layer)
    before = score_neurons(layer, {"l": layer}, cfg, progress=False)["l"]
    with torch.no_grad():
        layer(torch.randn(3, 40))
    assert layer.weight.dtype == torch.int8 and getattr(layer.weight, "SCB", None) is None  # the case at stake
    torch.testing.assert_close(dequantize_weight(layer), dense, rtol=0, atol=0)  # the forward changed no value
    after = score_neurons(layer, {"l": layer}, cfg, progress=False)["l"]
    reference = torch.linalg.vector_norm(dense, ord=p, dim=dim)
    torch.testing.assert_close(before, reference)
    torch.testing.assert_close(after, reference)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # not changed by the forward


@needs_4bit
def test_summary_counts_4bit_parameters_by_their_logical_size(saved_tiny):
    n_model = sum(p.numel() for p in tiny_quantizable().parameters())
    model = quantize_with_sparse_correction(tiny_quantizable(), SparseNeuronConfig(neurons_per_layer=4))  # fp32 storage
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    s = selection_summary(model)
    n_delta = sum(layer.delta.numel() for layer in sliced_modules(model).values())
    assert (s["model_params"], s["trainable_params"]) == (n_model, n_delta)

    loaded = _load(saved_tiny, "4bit")  # HF default: uint8 storage, two codes per byte
    total = lambda s: s["model_params"] + s["trainable_params"]  # its unquantized params still require grad
    assert total(selection_summary(loaded)) == n_model
    for p in loaded.parameters():
        if type(p).__name__ == "Params4bit":
            assert p.dtype == torch.uint8
            p.quant_state = None  # no shape to read: counted from the packed bytes
    assert total(selection_summary(loaded)) == n_model


# ---- merge back into 4-bit / 8-bit ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [pytest.param("4bit", marks=needs_4bit), pytest.param("8bit", marks=needs_8bit)])
@pytest.mark.parametrize("device", DEVICES)
def test_requantized_merge_changes_only_the_trained_rows(kind, device):
    torch.manual_seed(0)
    dense = nn.Linear(128, 48).to(device)
    base = _quantized(kind, dense.weight.detach(), dense.bias.detach(), device)
    before = dequantize_weight(base)
    model = nn.Sequential(SlicedLinear(base, torch.tensor([1, 20, 40])))
    with torch.no_grad():
        model[0].delta.normal_(std=0.02)
    merged_fp = model[0].merged_weight(before)
    merge_sparse(model, requantize=True)
    new = model[0]
    assert bnb_kind(new) == kind and not isinstance(new, SlicedLinear)
    if kind == "4bit":
        assert (new.weight.quant_state.quant_type, new.weight.quant_state.blocksize, new.compute_dtype) == (
            base.weight.quant_state.quant_type, base.weight.quant_state.blocksize, base.compute_dtype)
    after = dequantize_weight(new)
    untouched = torch.ones(48, dtype=torch.bool, device=device)
    untouched[[1, 20, 40]] = False
    assert torch.equal(after[untouched], before[untouched])  # re-quantizing Q(W) gives Q(W) back
    rows = after[~untouched] - merged_fp[~untouched]
    assert 0 < rows.norm() < (before[~untouched] - dense.weight[~untouched]).norm() * 2  # ordinary quantization error
    with pytest.raises(ValueError, match="nothing to re-quantize"):
        merge_sparse(nn.Sequential(SlicedLinear(nn.Linear(4, 4), torch.tensor([0]))), requantize=True)


# ---- bad input ------------------------------------------------------------------------------------------------
@needs_4bit
def test_quantized_model_without_bitsandbytes_is_a_clear_error(saved_tiny, tmp_path, monkeypatch):
    model = _load(saved_tiny, "4bit")
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"layer 'model.layers.0.self_attn.q_proj'.*needs bitsandbytes.*pip install"):
        SparseNeuronTrainer(model=model, args=_args(tmp_path), train_dataset=TokenDataset(),
                            sparse_config=SparseNeuronConfig(neurons_per_layer=4))
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        dequantize_weight(model.model.layers[0].mlp.up_proj)
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        quantize_with_sparse_correction(tiny_model(), SparseNeuronConfig(neurons_per_layer=4))


@needs_4bit
def test_zero3_needs_quant_storage_in_the_compute_dtype(saved_tiny, tmp_path, monkeypatch):
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    model = nn.Sequential(nn.Embedding(8, 64, dtype=torch.bfloat16), quantize_4bit(w, None, quant_storage=torch.uint8))
    with pytest.raises(ValueError, match=r"stores them as uint8.*bnb_4bit_quant_storage=torch.bfloat16"):
        check_zero3_quant_storage(model, torch.bfloat16)
    model[1] = quantize_4bit(w, None)  # storage = the weight's dtype (what quantize_base does)
    check_zero3_quant_storage(model, torch.bfloat16)
    with pytest.raises(ValueError, match="8-bit"):
        check_zero3_quant_storage(nn.Sequential(quantize_8bit(w.float(), None)))

    import transformers.integrations.deepspeed as hf_ds
    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="ZeRO-3 with a 4-bit base"):  # a default BitsAndBytesConfig stores uint8
        SparseNeuronTrainer(model=_load(saved_tiny, "4bit"), args=_args(tmp_path), train_dataset=TokenDataset(),
                            sparse_config=SparseNeuronConfig(neurons_per_layer=4))


@needs_4bit
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_after_bitsandbytes_cpu_repacking(double_quant):
    """A CPU inference forward on an AVX512-BF16 machine repacks the 4-bit codes in place; simulated here."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    layer = quantize_4bit(torch.randn(64, 128), None, double_quant=double_quant)
    expected = dequantize_weight(layer)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    torch.testing.assert_close(dequantize_weight(layer), expected, rtol=1e-2, atol=0)  # absmax kept in bf16


@needs_4bit
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_after_an_eval_forward_keeps_the_weights_from_before_it(double_quant, requantize, device):
    """The real path of the test above: evaluate, then merge. On an AVX512-BF16 CPU the eval forward without grad
    repacks the 4-bit codes for bitsandbytes' packed kernel; the merge must read them back in the standard layout."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 64).to(device)  # in_features a multiple of 64, out_features of 32: the packed layout's
    base = with_bnb_inference_kernel(_quantized("4bit", dense.weight.detach(), dense.bias.detach(), device,
                                                double_quant=double_quant))
    before = dequantize_weight(base)
    rows = torch.tensor([1, 20, 40], device=device)
    model = nn.Sequential(SlicedLinear(base, rows)).eval()
    with torch.no_grad():
        model[0].delta.normal_(std=0.02)
        w_hat = model[0].merged_weight(before)
        x = torch.randn(2, 5, 128, device=device)
        y = model(x)
    assert _packed(base) == _packs_4bit(device)  # the path at stake ran
    torch.testing.assert_close(y, x @ w_hat.T + dense.bias, rtol=2e-2, atol=2e-2)  # bf16 activations when packed

    merge_sparse(model, requantize=requantize)
    new = model[0]
    assert bnb_kind(new) == ("4bit" if requantize else None) and not isinstance(new, SlicedLinear)
    after = dequantize_weight(new)
    # repacking keeps the absmax in bf16 (each weight within bf16's unit roundoff 2^-8); with double quantization
    # the way back quantizes that absmax to 8 bits again
    rtol = 1e-2 if double_quant else 2.0 ** -8
    untouched = torch.ones(64, dtype=torch.bool, device=device)
    untouched[rows] = False
    assert ((after - w_hat)[untouched].abs() <= rtol * before[untouched].abs()).all()
    if requantize:  # trained rows: the ordinary error of quantizing W_hat
        assert 0 < (after - w_hat)[rows].norm() < 2 * (before - dense.weight)[rows].norm()
    else:
        assert ((after - w_hat)[rows].abs() <= rtol * before[rows].abs() + 1e-6).all()  # + fp32 rounding of the sum
