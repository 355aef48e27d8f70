"""`python -m sprune_trainer.export ADAPTER_DIR BASE_MODEL OUT_DIR`: a saved sparse adapter as a PEFT LoRA adapter
that plain PEFT and LoRA servers load (io/peft_export.py; docs/serving.md). BASE_MODEL is the model the adapter was
trained on: a local folder or anything `from_pretrained` accepts. Bad input stops before the model loads, as argparse
does: usage, one error line, exit code 2."""
from __future__ import annotations

import argparse
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sprune_trainer.export",
                                     description="Export a sparse adapter as an exact PEFT LoRA adapter.")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                        help="a sparse adapter folder (save_sparse_adapter, trainer.save_model(), a checkpoint)")
    parser.add_argument("base_model", metavar="BASE_MODEL",
                        help="the model it was trained on: a local folder or a hub id (the PEFT adapter's "
                             "base_model_name_or_path)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="where adapter_config.json and adapter_model.safetensors go (created)")
    return parser


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    from .io.adapter import read_sparse_adapter
    try:
        adapter = read_sparse_adapter(args.adapter_dir)  # checksums and consistency: small files, read fast
    except (OSError, ValueError) as e:
        parser.error(f"ADAPTER_DIR: {_first_line(e)}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"OUT_DIR: {args.out_dir} is a file, not a folder")
    looks_local = os.path.isabs(args.base_model) or args.base_model.startswith((".", "~"))  # hub ids never do
    if os.path.isfile(args.base_model) or (looks_local and not os.path.isdir(args.base_model)):
        parser.error(f"BASE_MODEL: {args.base_model} is no folder; give the model's folder or hub id")

    import transformers
    from . import export_peft_lora, load_sparse_adapter
    cls = getattr(transformers, adapter.model_class or "", None)  # the class it was saved from: the same head
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(args.base_model, dtype="auto")
    except (OSError, ValueError) as e:
        parser.error(f"BASE_MODEL: {_first_line(e)}")
    try:
        load_sparse_adapter(model, args.adapter_dir)
    except ValueError as e:
        parser.error(f"the adapter does not fit BASE_MODEL: {_first_line(e)}")
    export_peft_lora(model, args.out_dir, base_model=args.base_model)
    print(f"wrote a PEFT LoRA adapter of {len(adapter.selection)} layers to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
