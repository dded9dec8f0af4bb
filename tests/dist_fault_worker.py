"""torchrun worker for tests/test_reliability_distributed.py: all-reduces in a loop; rank 1 dies mid-run.

Run: ``torchrun --standalone --nproc_per_node 2 tests/dist_fault_worker.py <die_at_step>``.
Rank 0 would block forever in the next collective if the launcher did not notice rank 1's death.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    die_at = int(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x = torch.ones(4)
    for step in range(1, 1000):
        dist.all_reduce(x)
        x /= dist.get_world_size()
        if rank == 1 and step == die_at:
            os._exit(1)  # no cleanup, like a crash or an OOM kill
        time.sleep(0.01)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
