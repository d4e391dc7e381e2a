"""The main() of the tests' torchrun workers: 2 gloo ranks on CPU, one thread each, every arm's result
saved as OUT_DIR/<arm>_rank<r>.pt (what conftest.torchrun_two_ranks loads)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist


def main(arms: dict[str, Callable[[int], dict]]) -> None:
    """Run each arm(rank) in order on every rank and save what it returns."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, arm in arms.items():
        torch.save(arm(rank), out_dir / f"{name}_rank{rank}.pt")
    dist.destroy_process_group()
