"""TrainingArguments.optim is honoured over the slices: each optimizer the user picks trains the slices exactly as it
trains the dense weights with a row mask; the default stays SliceAdamW."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

from helpers import TokenDataset, masked_dense_training, tiny_model
from sprune_trainer import SliceAdamW, SparseNeuronConfig, SparseNeuronTrainer, merge_sparse
from sprune_trainer.layers.surgery import sliced_modules
from sprune_trainer.optim.holds_slices import unwrap_optimizer
from helpers import trainer_args as _args

# per-element optimizers: masked dense weights get zero gradients and so zero updates, the slice-only reference.
# bitsandbytes keeps tensors under 4,096 numbers in 32-bit state, so on these tiny layers its 8-bit optimizers run
# their 32-bit kernels: the test checks that they are built and stepped over the slices, not 8-bit rounding.
DEFAULT = str(TrainingArguments.__dataclass_fields__["optim"].default)  # adamw_torch_fused in 5.x, SliceAdamW here
# (not rmsprop: its first step is 10 lr sign(g), so float-order noise in a near-zero gradient, which the masked dense
# model sums in another order, can move an element half its step apart: seen on transformers 4.57's tiny model)
OPTIMS = [o for o in ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "adamw_bnb_8bit", "paged_adamw_8bit")
          if o != DEFAULT]


@pytest.mark.parametrize("optim", OPTIMS)
def test_the_users_optimizer_trains_the_slices_as_it_trains_masked_dense_weights(tmp_path, optim):
    data = TokenDataset(n=8)
    args = _args(tmp_path, optim=optim, per_device_train_batch_size=8, max_steps=3)
    trainer = SparseNeuronTrainer(model=tiny_model(), args=args, train_dataset=data,
                                  sparse_config=SparseNeuronConfig(neurons_per_layer=4, importance="l2"))
    trainer.train()
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert isinstance(unwrap_optimizer(trainer.optimizer), cls) and cls is not SliceAdamW
    selection = {n: m.index.clone() for n, m in sliced_modules(trainer.model).items()}
    ours = merge_sparse(trainer.model).state_dict()

    expected = masked_dense_training(selection, "rows", lambda w: cls(w, **kwargs), data, steps=3)
    start = tiny_model().state_dict()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-3, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    assert sum(not torch.equal(ours[k], start[k]) for k in expected) == len(selection)


def test_the_default_optim_keeps_slice_adamw(tmp_path):
    trainer = SparseNeuronTrainer(model=tiny_model(), args=_args(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                                  sparse_config=SparseNeuronConfig(neurons_per_layer=4, importance="l2"))
    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), SliceAdamW)
