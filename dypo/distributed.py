"""One process or many: under torchrun the trainer joins a process group (gloo on CPU, NCCL on CUDA, chosen
automatically, with a timeout on every collective so that a dead rank ends the others instead of hanging them),
shards the policy and the reference with FSDP2 (``fully_shard`` per decoder layer, then the whole), and uses the
few collectives below. Prompts are split across ranks in contiguous blocks, so every group stays on one rank and
the ranks' rewards, gathered in rank order, are the single-process batch."""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from dypo.metrics import merge_metrics


class World:
    """This process's place among the trainer's processes (rank 0 of 1 without torchrun)."""

    def __init__(self, rank=0, size=1, device=None):
        self.rank, self.size = rank, size
        self.device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def distributed(self):
        return self.size > 1

    @property
    def main(self):
        return self.rank == 0

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """1-D tensors of equal length from every rank, concatenated in rank order."""
        if not self.distributed:
            return values
        parts = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def gather_objects(self, items: list) -> list:
        """Every rank's list, concatenated in rank order."""
        if not self.distributed:
            return items
        everyone = [None] * self.size
        dist.all_gather_object(everyone, items)
        return [item for part in everyone for item in part]

    def total(self, value: float) -> float:
        """The sum of every rank's value."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor)
        return tensor.item()

    def combine(self, metrics: dict) -> dict:
        """Every rank's metrics of a step, merged (``merge_metrics``)."""
        return merge_metrics(self.gather_objects([metrics])) if self.distributed else metrics

    def barrier(self):
        if self.distributed:
            dist.barrier()

    @property
    def collective_device(self):
        return self.device if self.distributed and dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(timeout_seconds: float) -> World:
    """The process group when torchrun started several processes (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return World(rank, size, device)


def close(world: World, finished: bool):
    """Leave the process group. After a finished run every rank first waits for the others: without it, a rank
    that tore its gloo connections down while rank 0 still wrote its outputs was seen to abort ("terminate called
    without an active exception"), a few times in about 40 two-process runs on CPU."""
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model):
    layers = getattr(model.get_decoder(), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def shard(head, model, device):
    """FSDP2 for a FusedHead: each decoder layer its own unit (its parameters gathered only while it runs), then
    the rest. One tiny forward through the head makes it FSDP's root before generate() calls the layers directly
    (a layer reached first would make itself a root)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(head)
    with torch.no_grad():
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        head(ids, torch.ones_like(ids), lambda hidden, weight, bias: None)
    reshard(head)


def reshard(module):
    """Back to the shards: FSDP2 leaves the root's parameters gathered after a forward (for the backward it
    expects), and while they are, ``parameters()`` yields the gathered tensors, not the ones the optimizer and the
    checkpoints know."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextlib.contextmanager
def gathered(module, world: World):
    """Full parameters on every rank for the duration (generation runs outside the sharded forward): gathered
    once and kept, so that ranks whose rollouts end at different lengths run no collective meanwhile. The root
    keeps FSDP's own setting (its parameters stay gathered after a forward, for the backward)."""
    if not world.distributed:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in module.modules() if isinstance(m, FSDPModule) and m is not module]
    for unit in layers:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in [module, *layers]:
        unit.unshard()
    try:
        yield
    finally:
        for unit in layers:
            unit.set_reshard_after_forward(True, recurse=False)
        reshard(module)
