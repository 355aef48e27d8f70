"""The console line that says what a sparse run trains, printed once the neurons are chosen, before the first step:
the criterion, the neurons per layer and the trainable share (the library logs its full summary at INFO only)."""
from __future__ import annotations

from transformers import TrainerCallback


def selection_line(config, summary: dict) -> str:
    per_layer = sorted({f"{v['min']}" if v["min"] == v["max"] else f"{v['min']}-{v['max']}"
                        for v in summary["neurons"].values()})
    return (f"[sparse] importance={config.importance}, axis={config.axis}, scope={config.scope}: "
            f"{'/'.join(per_layer)} neurons per layer in {summary['sliced_layers']} layers; training "
            f"{summary['trainable_params']:,} of {summary['model_params']:,} weights "
            f"({summary['trainable_percent']:.2f} %)")


class AnnounceSelection(TrainerCallback):
    """Prints `selection_line` when SparseNeuronTrainer reports its selection (`on_neurons_selected`)."""

    def __init__(self, config):
        self.config = config

    def on_neurons_selected(self, args, state, control, model=None, selection=None, summary=None, **kwargs):
        if summary is not None and state.is_world_process_zero:
            print(selection_line(self.config, summary), flush=True)
