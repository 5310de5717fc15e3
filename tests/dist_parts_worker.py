"""Under `torchrun --nproc_per_node 2`: frozen rows/columns cut like DTensor shards equal the cut dense mask.

For even and uneven row counts, rows and columns, and shards along either dim, `FrozenLines.local` (indices mapped
to the local shard) must freeze exactly the entries of `FrozenEntries.local` (the dense mask distributed like the
parameter, which is what FSDP2's shards are); exits non-zero otherwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from safeunits.train.masks import FrozenEntries, FrozenLines


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(0)  # the same cases in every process
    checked = 0
    for shape in ((7, 5), (8, 6), (1, 4)):
        for shard_dim in (0, 1):
            param = distribute_tensor(torch.randn(shape, generator=gen), mesh, [Shard(shard_dim)])
            for dim in (0, 1):
                index = torch.randperm(shape[dim], generator=gen)[: max(1, shape[dim] // 2)].sort().values
                lines = FrozenLines(dim, index)
                local = lines.local(param)
                expected = FrozenEntries(lines.dense(torch.Size(shape))).local(param).mask
                got = local.dense(param.to_local().shape)
                assert torch.equal(got, expected), (shape, shard_dim, dim, dist.get_rank(), got, expected)
                values = param.to_local()
                assert torch.equal(local.take(values).flatten(), values[expected])  # the saved frozen values
                checked += 1
    print(f"rank {dist.get_rank()}: {checked} cases ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
