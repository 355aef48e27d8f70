"""Make a model's loss non-finite at chosen optimizer steps, as a real bf16 blow-up would (test helper).

`mode="logits"` puts NaN into the logits (loss and gradients non-finite); `mode="loss"` adds +inf to the
loss only (gradients stay finite, so only the loss check can catch it)."""
import torch


def inject_nonfinite(model, trainer, steps, mode="logits", micro_batches=None):
    """steps: 1-based optimizer steps to poison (None = every step); micro_batches: which micro-batches of
    such a step (0-based within the step; None = all)."""
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
