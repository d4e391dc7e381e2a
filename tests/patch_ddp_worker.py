"""Run by tests/test_patch.py under `torchrun --nproc_per_node 2` (gloo, CPU).

The `encodec` package's 24 kHz model, patched, trained end to end under DistributedDataParallel; each rank
sees its own audio. DDP's own buffer broadcast is switched off, so whatever keeps the codebooks equal is
the codebook's synchronisation. Saves what the test compares into OUT_DIR/<arm>_rank<r>.pt.
"""

from __future__ import annotations

import functools

import rank_worker
import torch
from encodec import EncodecModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from studylib import ExpiryConfig, patch_codebooks

SAMPLES = 19 * 320  # 19 frames at 75 Hz per item
ARMS = {  # expiry, training steps
    "fixed": (ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5), 10),
    "upstream": (ExpiryConfig(mode="upstream"), 3),  # the control: ranks drift apart from the first step
}


class Autoencoder(nn.Module):
    """encoder -> quantizer -> decoder, the training path (EncodecModel.forward only encodes codes)."""

    def __init__(self, model: EncodecModel, bandwidth: float = 1.5):
        super().__init__()
        self.model, self.bandwidth = model, bandwidth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.model.quantizer(self.model.encoder(x), self.model.frame_rate, self.bandwidth)
        return self.model.decoder(q.quantized), q.penalty


def run(arm: str, rank: int) -> dict:
    torch.manual_seed(0)  # the same initial model on both ranks
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    expiry, steps = ARMS[arm]
    replaced = patch_codebooks(model, expiry=expiry)
    ddp = DistributedDataParallel(Autoencoder(model).train(), broadcast_buffers=False)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for _ in range(steps):
        x = torch.randn(1, 1, SAMPLES, generator=g) * (0.1 + 0.2 * rank)
        y, penalty = ddp(x)
        loss = (y - x).abs().mean() + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    codebooks = [layer._codebook for layer in model.quantizer.vq.layers[:2]]
    return {
        "patched": replaced,
        "state": {k: v.clone() for k, v in model.quantizer.state_dict().items()},
        "params": {k: v.detach().clone() for k, v in model.encoder.state_dict().items()},
        "replaced_total": [int(cb.replaced_total) for cb in codebooks],
        "checks": [int(cb.checks) for cb in codebooks],
        "class": type(codebooks[0]).__module__,
    }


if __name__ == "__main__":
    rank_worker.main({arm: functools.partial(run, arm) for arm in ARMS})
