"""Run by tests/test_patch_audiocraft.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Multi-process training as AudioCraft's CompressionSolver does it: no DDP wrapper; after the backward,
`flashy.distrib.sync_model(model)` averages the gradients *and every floating-point buffer* (the codebooks
included) across ranks, then the optimizer steps. The model: a strided conv encoder, AudioCraft's 24 kHz RVQ
(32 x 1024 x 128, quantizer dropout) and a conv decoder; each rank sees its own audio, and every rank seeds
the global RNG alike (as audiocraft/train.py does), so the dropout draws the same number of levels everywhere.
Saves what the test compares into OUT_DIR/<arm>_rank<r>.pt.
"""

from __future__ import annotations

import functools

import flashy
import rank_worker
import torch
from torch import nn

from studylib import ExpiryConfig, patch_codebooks
from studylib.quantizers.patch import load_audiocraft_quantization

HOP, FRAMES = 320, 19  # 19 frames at 75 Hz per item, 2 items per rank and step
ARMS = {  # expiry (None: AudioCraft's own codebook, unpatched), training steps
    "fixed": (ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5), 10),
    "audiocraft": (None, 3),  # the control: its ranks' codebooks differ before every averaging
}


def build(expiry: ExpiryConfig | None) -> tuple[nn.Module, nn.Module, int]:
    qz = load_audiocraft_quantization()
    torch.manual_seed(0)  # the same initial model on both ranks
    rvq = qz.ResidualVectorQuantizer(dimension=128, n_q=32, q_dropout=True, bins=1024, decay=0.99,
                                     kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2)
    model = nn.ModuleDict({"encoder": nn.Conv1d(1, 128, HOP, stride=HOP), "quantizer": rvq,
                           "decoder": nn.ConvTranspose1d(128, 1, HOP, stride=HOP)})
    replaced = patch_codebooks(model, expiry=expiry) if expiry is not None else 0
    return model, rvq, replaced


def codebook_state(rvq: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rvq.state_dict().items()}


def run(arm: str, rank: int) -> dict:
    expiry, steps = ARMS[arm]
    model, rvq, replaced = build(expiry)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own audio
    torch.manual_seed(7)  # the same on every rank: the quantizer dropout's draws
    sync_changed, levels = [], []
    for _ in range(steps):
        x = torch.randn(2, 1, FRAMES * HOP, generator=g) * (0.1 + 0.2 * rank)
        q = rvq(model["encoder"](x), 75)
        loss = (model["decoder"](q.x) - x).abs().mean() + q.penalty
        opt.zero_grad()
        loss.backward()
        before = codebook_state(rvq)
        flashy.distrib.sync_model(model)  # AudioCraft's step: average gradients and buffers over ranks
        after = codebook_state(rvq)
        sync_changed.append(sorted(k for k in before if not torch.equal(before[k], after[k])))
        levels.append(int(q.codes.shape[1]))
        opt.step()
    codebooks = [layer._codebook for layer in rvq.vq.layers]
    return {
        "patched": replaced,
        "class": type(codebooks[0]).__module__,
        "levels": levels,
        "sync_changed": sync_changed,
        "state": codebook_state(rvq),
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "checks": [int(getattr(cb, "checks", -1)) for cb in codebooks],
        "replaced_total": [int(getattr(cb, "replaced_total", -1)) for cb in codebooks],
    }


if __name__ == "__main__":
    rank_worker.main({arm: functools.partial(run, arm) for arm in ARMS})
