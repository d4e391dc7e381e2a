"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank trains on its own data and saves what the test compares into OUT_DIR/<arm>_rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from studylib.quantizers.ema import EuclideanCodebook, ExpiryConfig

STEPS = 25


def local_batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * rank + step)
    n = 400 if rank == 0 else 300  # ranks see different data, and different amounts of it
    return torch.randn(n, 16, generator=g) * (1 + step % 3) + rank


def fixed_arm(rank: int) -> dict:
    # Same generator seed on both ranks is not required; give them different ones to prove it.
    cb = EuclideanCodebook(16, 512, kmeans_iters=5, generator=torch.Generator().manual_seed(rank),
                           expiry=ExpiryConfig(mode="fixed", threshold=2.0)).train()
    for step in range(STEPS):
        cb(local_batch(step, rank))
    return {"state": cb.state_dict(), "replaced_total": int(cb.replaced_total), "checks": int(cb.checks)}


def upstream_arm(rank: int) -> dict:
    from encodec.quantization.core_vq import EuclideanCodebook as EncodecCodebook

    torch.manual_seed(0)
    theirs = EncodecCodebook(16, 512, kmeans_init=True, kmeans_iters=5, threshold_ema_dead_code=2).train()
    ours = EuclideanCodebook(16, 512, kmeans_iters=5, expiry=ExpiryConfig(mode="upstream")).train()
    equal_every_step = True
    for step in range(STEPS):
        x = local_batch(step, rank)
        torch.manual_seed(100 * step + rank)
        out_theirs = theirs(x)
        torch.manual_seed(100 * step + rank)
        out_ours = ours(x)
        equal_every_step &= all(torch.equal(a, b) for a, b in zip(out_theirs, out_ours))
        equal_every_step &= all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(),
                                                                  ours.state_dict().values()))
    return {"state": ours.state_dict(), "equal_every_step": equal_every_step,
            "replaced_total": int(ours.replaced_total)}


def balancer_arm(rank: int) -> dict:
    """Each rank has its own data, so its own gradient norms; the balancer must scale by their mean."""
    from studylib.model.losses import Balancer

    balancer = Balancer({"l1": 0.1, "l2": 2.0})
    local_norms = []
    for step in range(3):
        g = torch.Generator().manual_seed(100 * rank + step)
        y = (torch.randn(4, 1, 64, generator=g) * (1 + rank)).requires_grad_()
        losses = {"l1": y.pow(4).mean(), "l2": y.pow(2).mean()}  # norms that depend on the data
        local_norms.append({k: float(torch.autograd.grad(v, y, retain_graph=True)[0].flatten(1).norm(dim=1).mean())
                            for k, v in losses.items()})
        balancer.backward(losses, y)
    return {"ema": {k: float(v) for k, v in balancer.averager.total.items()}, "local_norms": local_norms}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_flush_denormal(True)
    for name, arm in (("fixed", fixed_arm), ("upstream", upstream_arm), ("balancer", balancer_arm)):
        torch.save(arm(rank), out_dir / f"{name}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
