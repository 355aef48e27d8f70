"""The untrained guard decides alike on every rank: under ZeRO each rank steps its own partition of the slices, so
one rank may hold no gradient where another holds some. Two gloo processes on the CPU, each with its own local flags."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sprune_trainer import SlicesNotTrainingError
from sprune_trainer.training.untrained import UntrainedGuard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {"rank 1 trains": (False, True), "neither trains": (False, False)}  # (rank 0, rank 1) hold gradients


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for case, grads_on in CASES.items():
            p = torch.nn.Parameter(torch.zeros(4))
            p.grad = torch.full((4,), 1.0 if grads_on[rank] else 0.0)
            opt = torch.optim.SGD([p], lr=0.1)
            guard = UntrainedGuard(step_source=lambda: 0)
            pending = guard.before_step(opt)
            opt.step()
            try:
                guard.after_step(pending)
                results[(case, rank)] = "trained"
            except SlicesNotTrainingError:
                results[(case, rank)] = "stopped"
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_whether_the_slices_train():
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
    # rank 0 alone would have stopped in the first case
    assert dict(results) == {("rank 1 trains", 0): "trained", ("rank 1 trains", 1): "trained",
                             ("neither trains", 0): "stopped", ("neither trains", 1): "stopped"}
