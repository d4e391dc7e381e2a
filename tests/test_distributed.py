"""Two ranks over gloo on CPU, launched with torchrun: fixed codebooks stay identical across ranks,
upstream mode does exactly what encodec 0.1.1 does under torch.distributed (rank-0 broadcasts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import torchrun_two_ranks

pytest.importorskip("encodec")
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    return torchrun_two_ranks(WORKER, tmp_path_factory.mktemp("ddp"), ("fixed", "upstream", "balancer"))


def test_fixed_codebooks_identical_on_every_rank(ranks):
    r0, r1 = ranks["fixed"]
    assert r0["checks"] == r1["checks"] == 25
    assert r0["replaced_total"] == r1["replaced_total"] > 0, "the test must exercise expiries"
    for name, value in r0["state"].items():
        assert (value - r1["state"][name]).abs().max().item() == 0, name


def test_upstream_matches_encodec_under_ddp_and_ranks_drift_apart(ranks):
    r0, r1 = ranks["upstream"]
    assert r0["equal_every_step"] and r1["equal_every_step"]
    assert r0["replaced_total"] > 0 and r1["replaced_total"] > 0
    # rank 0's buffers are broadcast before the EMA; each rank then applies its own counts, so the
    # codebooks differ at the end of every step (nothing all-reduces cluster_size / embed_avg)
    assert not torch.equal(r0["state"]["cluster_size"], r1["state"]["cluster_size"])


def test_balancer_averages_gradient_norms_over_ranks(ranks):
    r0, r1 = ranks["balancer"]
    assert r0["ema"] == r1["ema"]  # both ranks scale by the same norms
    decay = 0.999
    for name in ("l1", "l2"):
        local = [[step[name] for step in r["local_norms"]] for r in (r0, r1)]
        assert local[0] != local[1]  # the ranks' own norms differ
        mean = [(a + b) / 2 for a, b in zip(*local)]
        expected = sum(decay ** (len(mean) - 1 - i) * m for i, m in enumerate(mean))
        assert r0["ema"][name] == pytest.approx(expected, rel=1e-6)
