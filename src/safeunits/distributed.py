"""Multi-process runs that really are: the launcher's world size checked against Accelerate's, CPU (gloo) runs,
main-process-only outputs, and FSDP2 sharding for masked training.

Why this module exists: on a machine without a GPU, `torchrun --nproc_per_node 2` or `accelerate launch
--multi_gpu --num_processes 2` start two processes, but `Accelerator()` sees one (`DistributedType.NO`) unless
it is told to use the CPU -- each process then trains alone and both write the same output folder. And
`accelerate launch --cpu --num_processes 2` starts a single process (without `--mpirun_hostfile`). Both are
caught here: `make_accelerator` asks for gloo on CPU-only machines and refuses a world size that differs from
the launcher's.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import nn

Parallelism = Literal["ddp", "fsdp1", "fsdp2", "deepspeed"]

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LAUNCH_HINT = ("use `accelerate launch --multi_gpu --num_processes N -m safeunits ...` or "
               "`torchrun --nproc_per_node N -m safeunits ...` (on a machine without a GPU both run on CPU with gloo)")


class DistributedSetupError(RuntimeError):
    """The processes the launcher started do not match what the run would do (or the sharding cannot be exact)."""


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            return int(value)
    return default


def launcher_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) says this run has; 1 without one."""
    return _env_int(_WORLD_VARS, 1)


def is_main_process() -> bool:
    """True in the process that writes outputs (rank 0, or the only process); read from the launcher's variables."""
    return _env_int(_RANK_VARS, 0) == 0


def requested_parallelism() -> Parallelism:
    """The data-parallel flavour the launcher asked for (`accelerate launch --use_fsdp/--use_deepspeed`), else DDP."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    return "ddp"


def check_mask_support(parallelism: Parallelism, masked: bool) -> None:
    """Refuse a masked run where frozen weights could not stay bit-identical (flattened or partitioned parameters)."""
    if not masked or parallelism in ("ddp", "fsdp2"):
        return
    why = {"fsdp1": "FSDP1 flattens each wrapped module's parameters into one FlatParameter, so a per-weight mask "
                    "cannot follow them", "deepspeed": "DeepSpeed ZeRO partitions and flattens parameters and keeps "
                    "its own fp32 master copy, so restoring frozen entries after the step is not exact"}[parallelism]
    raise DistributedSetupError(f"masked training under {parallelism} is refused: {why}. Use DDP (`accelerate launch "
                                f"--multi_gpu`) or FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`).")


def check_world(num_processes: int) -> None:
    """Raise unless Accelerate sees as many processes as the launcher started (else each would train alone)."""
    launched = launcher_world_size()
    if launched != num_processes:
        raise DistributedSetupError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate sees {num_processes}: every "
            f"process would train alone on all the data and write the same outputs; {LAUNCH_HINT}")
    simple_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_ADDR" in os.environ
    if launched == 1 and simple_cpu and "LOCAL_RANK" not in os.environ:
        raise DistributedSetupError(
            "`accelerate launch --cpu --num_processes N` (N > 1) starts ONE process unless `--mpirun_hostfile` is "
            f"given; {LAUNCH_HINT}")


def make_accelerator(**kwargs: Any):
    """An `Accelerator` that runs every process the launcher started: gloo on CPU when there is no GPU.

    Also fixes the LR schedule to one scheduler step per optimizer step (Accelerate's default steps a prepared
    scheduler once per process, which under DDP would run the schedule N times too fast).
    """
    from accelerate import Accelerator

    cpu = launcher_world_size() > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, step_scheduler_with_optimizer=False, **kwargs)
    check_world(accelerator.num_processes)
    return accelerator


# --- FSDP2 -----------------------------------------------------------------------------------------


def fsdp2_shard(model: nn.Module, world: int) -> nn.Module:
    """`fully_shard` each transformer block (the model's `_no_split_modules`) and then the root, on a CPU/GPU mesh.

    Used when the launcher asked for FSDP2 but Accelerate cannot do it (CPU processes: Accelerate's FSDP
    plugin needs GPUs); the parameters become DTensors sharded on dim 0, as under Accelerate's plugin.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (world,))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are DTensor shards (FSDP2); its weights must be gathered to be saved."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of an FSDP2 model on CPU, in rank 0; other ranks get an empty dict.

    Every process must call it (it is a collective).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- sharded evaluation ----------------------------------------------------------------------------


class ProcessShard:
    """This process's share of a list of work items, and the collective that puts the shares back in order.

    Why: under `accelerate launch` / `torchrun`, every process runs the same evaluation; each answers every
    `world`-th item (of a length-sorted list, so the shares cost about the same) and `gather` gives every process
    all results in the original order, so each computes the same metrics and the main process alone writes them.
    One process (no launcher) is the trivial shard: `take` is the list, `gather` returns it.
    """

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: list) -> list:
        return items[self.rank::self.world]

    def gather(self, mine: list) -> list:
        """Every process's `take` results, interleaved back into the order of the list they were taken from."""
        if self.world == 1:
            return list(mine)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, list(mine))
        out: list = [None] * sum(len(p) for p in parts)
        for rank, part in enumerate(parts):
            out[rank::self.world] = part
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def process_shard() -> ProcessShard:
    """This process's `ProcessShard`: the launcher's processes joined in one group (gloo on CPU), or the trivial one."""
    if launcher_world_size() == 1:
        return ProcessShard()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    check_world(state.num_processes)
    return ProcessShard(state.process_index, state.num_processes)
