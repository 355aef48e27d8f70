"""A GGUF model to a float32 safetensors folder, as `recipes/commonsense/modeling._load_gguf` + `save_pretrained` make
it, in a fraction of the device time (studies/device/qwen15_device.sh). That path parses the GGUF's metadata three
times (config, tokenizer, weights: ~11 s each for Qwen2.5's 151k-token vocabulary) and dequantizes 339 tensors on
one core (~30 s): ~100 s of each device session. Here the work is split in two:

    python studies/device/gguf_convert.py meta GGUF OUT      # config, generation config, tokenizer, tensor layout
    python studies/device/gguf_convert.py tensors GGUF OUT   # the weights, dequantized in parallel, one safetensors
    python studies/device/gguf_convert.py check OUT REF      # OUT equals REF (transformers' own conversion) exactly

`meta` reads only the metadata at the head of the file, so it can run (in the background) on a GGUF of which only the
first staged part has arrived, padded with zeros to its full size; it uses transformers' own config and tokenizer
conversion and its own GGUF -> HF tensor-name map, and refuses an architecture whose tensors transformers reshapes
(llama's q/k permutation and the like), which `tensors` does not redo. `tensors` then dequantizes each tensor with
gguf-py's `dequantize` (what transformers calls) in worker processes that write straight into their place in
OUT/model.safetensors. `check` compares every tensor, the config and the tokenizer files with a folder transformers
wrote; the Qwen2.5-Coder-1.5B-Instruct conversion was checked equal this way."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

LAYOUT = "gguf_layout.json"  # in OUT: where each tensor's bytes lie in the GGUF, and its HF name


def meta(gguf_path: Path, out: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    t0 = time.time()
    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    AutoTokenizer.from_pretrained(**where).save_pretrained(out)
    config = AutoConfig.from_pretrained(**where)
    reader = GGUFReader(gguf_path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor_cls = hf_gguf.TENSOR_PROCESSORS.get(arch, hf_gguf.TensorProcessor)
    if processor_cls is not hf_gguf.TensorProcessor:
        raise SystemExit(f"{arch}: transformers reshapes its tensors ({processor_cls.__name__}); use _load_gguf")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.dtype = torch.float32  # what from_pretrained(dtype=float32) and save_pretrained record
    model.config.architectures = [type(model).__name__]
    names = hf_gguf.get_gguf_hf_weights_map(model, hf_gguf.TensorProcessor(config=config.to_dict()))
    # shape: what GGUFReader gives gguf-py's dequantize (bytes per row for a quantized type); values: its output's
    tensors = [{"gguf": t.name, "hf": names[t.name], "type": int(t.tensor_type), "offset": int(t.data_offset),
                "n_bytes": int(t.n_bytes), "shape": list(t.data.shape), "values": list(reversed(t.shape.tolist()))}
               for t in reader.tensors if t.name in names]
    wanted = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = wanted - {t["hf"] for t in tensors}
    if missing:
        raise SystemExit(f"no GGUF tensor for {sorted(missing)[:4]} ({len(missing)} in all)")
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    (out / LAYOUT).write_text(json.dumps({"file_bytes": gguf_path.stat().st_size, "tensors": tensors}, indent=1))
    print(f"meta: {len(tensors)} tensors, config and tokenizer in {out} ({time.time() - t0:.0f} s)")


def _dequantized(gguf_path: str, t: dict):
    """float32 numpy array of one tensor, from the array GGUFReader would hand gguf-py's dequantize: F32 / F16 values,
    else (a quantized type) the bytes, shaped as the reader shapes them."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType(t["type"])
    if qtype.name in ("F64", "I8", "I16", "I32", "I64"):
        raise SystemExit(f"{t['gguf']}: type {qtype.name} is not converted here; use _load_gguf")
    raw = np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=t["offset"], shape=(t["n_bytes"],))
    item = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)
    return np.ascontiguousarray(dequantize(raw.view(item).reshape(t["shape"]), qtype), dtype=np.float32)


def _write_one(job) -> str:
    import numpy as np
    gguf_path, out_file, begin, t = job
    values = _dequantized(gguf_path, t)
    dst = np.memmap(out_file, dtype=np.uint8, mode="r+", offset=begin, shape=(values.nbytes,))
    dst[:] = values.reshape(-1).view(np.uint8)
    dst.flush()
    return t["hf"]


def _safetensors_header(entries: list[tuple[str, list[int], int]]) -> tuple[bytes, list[int]]:
    """safetensors' header for float32 tensors (name, shape, n_bytes) in name order, as its writer lays them out
    (metadata first, compact JSON padded with spaces to 8 bytes); the data offsets of each tensor."""
    header, begins, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape, n in sorted(entries):
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
        begins.append(pos)
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, begins


def tensors(gguf_path: Path, out: Path, jobs: int) -> None:
    import math
    import os

    from tqdm import tqdm

    t0 = time.time()
    layout = json.loads((out / LAYOUT).read_text())
    if gguf_path.stat().st_size != layout["file_bytes"]:
        raise SystemExit(f"{gguf_path} has {gguf_path.stat().st_size} bytes, its metadata said {layout['file_bytes']}")
    by_name = {t["hf"]: t for t in layout["tensors"]}
    sizes = {n: 4 * math.prod(t["values"]) for n, t in by_name.items()}  # float32 bytes
    header, begins = _safetensors_header([(n, t["values"], sizes[n]) for n, t in by_name.items()])
    target = out / "model.safetensors"
    tmp = target.with_name(target.name + ".tmp")  # renamed when whole: a crash leaves no half-written model
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(sizes.values()))
    work = [(str(gguf_path), str(tmp), len(header) + b, by_name[n]) for n, b in zip(sorted(by_name), begins)]
    work.sort(key=lambda w: -w[3]["n_bytes"])  # the largest first, so no worker is left with one at the end
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for _ in tqdm(pool.imap_unordered(_write_one, work), total=len(work), desc="dequantizing", mininterval=5):
            pass
    os.replace(tmp, target)
    print(f"tensors: {len(work)} into {target} with {jobs} processes ({time.time() - t0:.0f} s)")


def check(out: Path, ref: Path) -> None:
    import torch
    from safetensors import safe_open

    a, b = safe_open(out / "model.safetensors", "pt"), safe_open(ref / "model.safetensors", "pt")
    if set(a.keys()) != set(b.keys()):
        raise SystemExit(f"different tensors: {sorted(set(a.keys()) ^ set(b.keys()))[:4]}")
    bad = [k for k in b.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    differ = [f for f in files if (ref / f).exists() and (out / f).read_bytes() != (ref / f).read_bytes()]
    print(f"check: {len(list(b.keys())) - len(bad)} of {len(list(b.keys()))} tensors equal; files differing: {differ}")
    if bad or differ:
        raise SystemExit(f"not equal: tensors {bad[:4]}, files {differ}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("meta", "tensors", "check"))
    ap.add_argument("src", type=Path, help="the GGUF file (check: the folder made here)")
    ap.add_argument("out", type=Path, help="the output folder (check: the reference folder)")
    ap.add_argument("--jobs", type=int, default=min(16, multiprocessing.cpu_count()))
    args = ap.parse_args(argv)
    if args.stage == "check":
        return check(args.src, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (meta if args.stage == "meta" else lambda g, o: tensors(g, o, args.jobs))(args.src, args.out)


if __name__ == "__main__":
    sys.exit(main())
