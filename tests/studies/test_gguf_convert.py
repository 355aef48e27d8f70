"""The device's fast GGUF conversion (studies/device/gguf_convert.py) against transformers' own (the recipe's
_load_gguf + save_pretrained), on a tiny seeded Qwen2 GGUF written here (Q8_0 matrices, F32 norms and biases): the
same safetensors bytes, config and tokenizer files, with the metadata read from the file's head alone."""
import filecmp
import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch

from helpers import REPO

gguf = pytest.importorskip("gguf")
SHAPE = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=300)


def _convert_module():
    spec = importlib.util.spec_from_file_location("gguf_convert", REPO / "studies" / "device" / "gguf_convert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gguf_convert"] = module  # its worker processes find their function by module name
    spec.loader.exec_module(module)
    return module


def _write_tiny_gguf(path, arch="qwen2"):
    from gguf.quants import quantize

    h, ff, kv = SHAPE["hidden"], SHAPE["ffn"], SHAPE["kv_heads"] * SHAPE["hidden"] // SHAPE["heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_block_count(SHAPE["layers"])
    w.add_feed_forward_length(ff)
    w.add_head_count(SHAPE["heads"])
    w.add_head_count_kv(SHAPE["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    n = SHAPE["vocab"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([bytes([i]).decode("latin-1") for i in range(256)] + [f"t{i}" for i in range(n - 258)]
                     + ["<|endoftext|>", "<|im_end|>"])
    w.add_token_types([1] * (n - 2) + [3, 3])
    w.add_token_merges(["t 0", "t 1"])
    w.add_bos_token_id(n - 2)
    w.add_eos_token_id(n - 1)
    rng = np.random.default_rng(0)

    def add(name, shape):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 2:
            q = quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)
    add("token_embd.weight", (n, h))
    add("output.weight", (n, h))
    add("output_norm.weight", (h,))
    for i in range(SHAPE["layers"]):
        for name, shape in (("attn_q", (h, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, h)),
                            ("ffn_gate", (ff, h)), ("ffn_up", (ff, h)), ("ffn_down", (h, ff))):
            add(f"blk.{i}.{name}.weight", shape)
        for name, width in (("attn_q", h), ("attn_k", kv), ("attn_v", kv), ("attn_norm", h), ("ffn_norm", h)):
            add(f"blk.{i}.{name}.{'weight' if 'norm' in name else 'bias'}", (width,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _head_only_copy(path, dst) -> None:
    """`path`'s bytes before its first tensor's data, zeros after, at its full size: the first staged part."""
    reader = gguf.GGUFReader(path)
    head = min(t.data_offset for t in reader.tensors)
    with open(path, "rb") as src, open(dst, "wb") as out:
        out.write(src.read(head))
        out.truncate(path.stat().st_size)


def test_fast_conversion_equals_transformers_own_from_the_file_head(tmp_path):
    from commonsense.modeling import _load_gguf

    conv = _convert_module()
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src)
    model, tok = _load_gguf(src, dtype=torch.float32)
    model.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")

    head = tmp_path / "head" / "tiny.gguf"
    head.parent.mkdir()
    _head_only_copy(src, head)
    out = tmp_path / "fast"
    conv.main(["meta", str(head), str(out)])
    conv.main(["tensors", str(src), str(out), "--jobs", "2"])
    conv.main(["check", str(out), str(tmp_path / "ref")])  # SystemExit on any difference
    assert filecmp.cmp(out / "model.safetensors", tmp_path / "ref" / "model.safetensors", shallow=False)
    assert len(model.state_dict()) == 2 + SHAPE["layers"] * 12 + 1  # embeddings, head, norm; 12 per layer

    shutil.copy(src, tmp_path / "short.gguf")
    with open(tmp_path / "short.gguf", "r+b") as f:
        f.truncate(src.stat().st_size - 1)
    with pytest.raises(SystemExit, match="bytes, its metadata said"):
        conv.main(["tensors", str(tmp_path / "short.gguf"), str(out)])


def test_an_architecture_whose_tensors_transformers_reshapes_is_refused(tmp_path):
    conv = _convert_module()
    src = tmp_path / "llama.gguf"
    _write_tiny_gguf(src, arch="llama")
    with pytest.raises(SystemExit, match="llama: transformers reshapes its tensors"):
        conv.main(["meta", str(src), str(tmp_path / "out")])
