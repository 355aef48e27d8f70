"""One rank of a 2-process (gloo, CPU) DDP run for test_nonfinite.py: the loss is made +inf on rank 1 only at
optimizer step 2 (its gradients stay finite), so only an all-reduced decision keeps the ranks in step.
usage: torchrun --nproc_per_node 2 nonfinite_ddp_worker.py OUT_DIR   -> each rank writes OUT_DIR/rank<r>.json"""
import json
import os
import sys

import torch
from transformers import TrainingArguments

from helpers import TokenDataset, inject_nonfinite, tiny_model  # tests/ is on PYTHONPATH (helpers.checkout_env)
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer

torch.set_num_threads(2)  # as tests/conftest.py (its env defaults come with the launcher's environment)

out = sys.argv[1]
rank = int(os.environ.get("RANK", "0"))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                         lr_scheduler_type="constant", report_to="none", disable_tqdm=True, save_strategy="no",
                         use_cpu=True, seed=5, logging_steps=1, ddp_backend="gloo" if "RANK" in os.environ else None)
trainer = SparseNeuronTrainer(model=tiny_model(), args=args, train_dataset=TokenDataset(n=32),
                              sparse_config=SparseNeuronConfig(neurons_per_layer=4, importance="l2"))
if rank == 1 or "RANK" not in os.environ:
    inject_nonfinite(trainer.model, trainer, steps={2}, mode="loss")
metrics = trainer.train().metrics
slices = {n: p.detach().flatten().tolist() for n, p in trainer.model.named_parameters() if p.requires_grad}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"skipped_steps": trainer.nonfinite.skipped_steps, "metric": metrics["train_nonfinite_skipped_steps"],
               "slices": slices}, f)
# shut gloo down before the interpreter exits: left to exit, its threads were once torn down while still joinable
# ("terminate called without an active exception", SIGABRT after the results were written)
if trainer.accelerator.num_processes > 1:
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
