"""One DeepSpeed training run on the CPU, for test_deepspeed.py (DeepSpeed needs a process of its own).
usage: python deepspeed_worker.py DS_CONFIG OUT_DIR [resume] [nan] [moe]   -> prints one JSON line of findings
(nan: the loss and gradients of optimizer step 2 are made NaN, for the non-finite guard; moe: a tiny Mixtral, whose
experts are sliced, instead of the tiny Llama)"""
import json
import os
import sys

import torch
from transformers import MixtralConfig, TrainingArguments

from helpers import SHAPE_MOE, TokenDataset, inject_nonfinite, tiny_model  # tests/ is on PYTHONPATH (helpers.checkout_env)
from sprune_trainer import SliceAdamW, SparseNeuronConfig, SparseNeuronTrainer
from sprune_trainer.io.adapter import read_sparse_adapter

torch.set_num_threads(2)  # as tests/conftest.py (its env defaults come with the launcher's environment)

ds_config, out, flags = sys.argv[1], sys.argv[2], set(sys.argv[3:])
resume = os.path.join(out, "checkpoint-2") if "resume" in flags else None
args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                         report_to="none", deepspeed=ds_config, disable_tqdm=True, save_strategy="steps",
                         save_steps=2, seed=3, logging_steps=1)
# after TrainingArguments: under ZeRO-3 transformers builds it partitioned
model = tiny_model(MixtralConfig(**SHAPE_MOE) if "moe" in flags else None)
partitioned = hasattr(model.model.layers[0].self_attn.q_proj.weight, "ds_id")
trainer = SparseNeuronTrainer(model=model, args=args, train_dataset=TokenDataset(),
                              sparse_config=SparseNeuronConfig(neurons_per_layer=4, importance="taylor",
                                                               calibration_batches=2))
if "nan" in flags:
    inject_nonfinite(trainer.model, trainer, steps={2})
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(os.path.join(out, "final"))
inner = trainer.optimizer.optimizer  # accelerate wrapper -> DeepSpeed ZeRO optimizer
adapter = read_sparse_adapter(os.path.join(out, "final"))
print(json.dumps({
    "partitioned_at_load": partitioned,
    "deepspeed_optimizer": type(inner).__name__,
    "client_optimizer": type(getattr(inner, "optimizer", None)).__name__,
    "slice_adamw": isinstance(getattr(inner, "optimizer", None), SliceAdamW),
    "deltas": {k: v.tolist() for k, v in adapter.tensors.items()},
    "selection": {k: v.tolist() for k, v in adapter.selection.items()},
    "checkpoint_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out, "checkpoint-2"))
                            for f in fs if not f.endswith(".py")),
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    "skipped_steps": trainer.nonfinite.skipped_steps,
}))
