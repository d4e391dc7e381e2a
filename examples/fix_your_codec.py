"""Fix your own EnCodec-style codec: patch the `encodec` package's model (or AudioCraft's) and train its quantizer.

The three lines a training script adds (after building / loading the model, before DDP):

    from studylib import ExpiryConfig
    from studylib import patch_codebooks
    patch_codebooks(model, expiry=ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5))
    ...  # state dicts stay EnCodec's; `unpatch_codebooks(model)` before pickling whole modules

This script builds `EncodecModel.encodec_model_24khz(pretrained=False)` (no download), freezes its encoder,
and trains only the quantizer (EMA codebooks need no optimizer) on the study corpus at EnCodec's per-GPU
regime: 8 x 1 s = 600 frames per step, 1024 codes, 8 levels (6 kbps). It does so twice, patched with
`upstream` (EnCodec as released, bit for bit, bug included) and with `fixed`, and prints per level the
fraction of the 1024 codes that held-out frames use, before training (right after k-means on the first
batch) and after it, plus the held-out SNR of the quantized latents.

With `--audiocraft` the quantizer is AudioCraft 1.3.0's `ResidualVectorQuantizer` with its 24 kHz EnCodec
settings (32 x 1024 x 128, k-means 50 iterations, threshold 2; loaded by
`studylib.quantizers.patch.load_audiocraft_quantization`), run at the same 8 levels without quantizer dropout so that
the two tables compare; the latents still come from the same frozen `encodec` encoder.

Mind the horizon: at decay 0.99 a relative threshold of 0.1 flags a code only after about 229 steps
without use (codes left empty by the k-means are flagged at the first check), so run a few hundred steps;
over a few dozen steps a correct expiry can look no better than EnCodec's.

    python examples/fix_your_codec.py [--audiocraft] [--manifest data/study/manifest.csv] [--steps 400]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from studylib import ExpiryConfig, patch_codebooks
from studylib.training.data import AudioDataset

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "upstream": ExpiryConfig(mode="upstream"),
    "fixed": ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5),
}


def build_model(seed: int):
    from encodec import EncodecModel

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation notice
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def encode(encoder, items: list[torch.Tensor], chunk: int = 16) -> torch.Tensor:
    """Latents [n, 128, 75] of 1 s crops, through the frozen encoder."""
    return torch.cat([encoder(torch.stack(items[i:i + chunk])) for i in range(0, len(items), chunk)])


@dataclass
class Quantizer:
    """The calls this script makes of a quantizer, for either library: `step` runs one forward (training
    or not, as the module's mode says); codes are [n_q, B, T] either way."""

    module: nn.Module
    levels: int
    step: Callable[[torch.Tensor], object]  # latents [B, 128, T] -> (ignored)
    encode: Callable[[torch.Tensor], torch.Tensor]  # latents [B, 128, T] -> codes [n_q, B, T]
    decode: Callable[[torch.Tensor], torch.Tensor]  # codes [n_q, B, T] -> latents [B, 128, T]


def encodec_quantizer(seed: int, frame_rate: int, bandwidth: float) -> Quantizer:
    rvq = build_model(seed).quantizer
    return Quantizer(rvq, rvq.get_num_quantizers_for_bandwidth(frame_rate, bandwidth),
                     lambda x: rvq(x, frame_rate, bandwidth), lambda x: rvq.encode(x, frame_rate, bandwidth),
                     rvq.decode)


def audiocraft_quantizer(seed: int, frame_rate: int, bandwidth: float) -> Quantizer:
    from studylib.quantizers.patch import load_audiocraft_quantization

    torch.manual_seed(seed)
    rvq = load_audiocraft_quantization().ResidualVectorQuantizer(  # config/model/encodec (24 kHz, causal)
        dimension=128, n_q=32, q_dropout=False, bins=1024, decay=0.99, kmeans_init=True, kmeans_iters=50,
        threshold_ema_dead_code=2)
    rvq.set_num_codebooks(max(1, int(bandwidth * 1000 // (np.log2(rvq.bins) * frame_rate))))  # 8 at 6 kbps
    return Quantizer(rvq, rvq.num_codebooks, lambda x: rvq(x, frame_rate), lambda x: rvq.encode(x).transpose(0, 1),
                     lambda codes: rvq.decode(codes.transpose(0, 1)))


@torch.no_grad()
def held_out_stats(quantizer: Quantizer, latents: torch.Tensor) -> tuple[list, float]:
    """Per level, the fraction of codes that the held-out frames use; SNR (dB) of the quantized latents."""
    codes = quantizer.encode(latents)  # [n_q, B, T]
    bins = quantizer.module.bins
    usage = [codes[level].unique().numel() / bins for level in range(codes.shape[0])]
    error = latents - quantizer.decode(codes)
    snr = 10 * torch.log10(latents.var() / error.pow(2).mean())
    return usage, float(snr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audiocraft", action="store_true",
                        help="patch AudioCraft 1.3.0's quantizer instead of the encodec package's")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data" / "study" / "manifest.csv",
                        help="a corpus manifest written by `studylib corpus` (train and valid splits)")
    parser.add_argument("--steps", type=int, default=400, help="quantizer training steps per arm")
    parser.add_argument("--batch", type=int, default=8, help="1 s crops per step (8 = 600 frames, EnCodec per GPU)")
    parser.add_argument("--pool", type=int, default=384, help="training crops encoded once (the encoder is frozen)")
    parser.add_argument("--held-out", type=int, default=64, help="1 s windows of the valid split for usage")
    parser.add_argument("--bandwidth", type=float, default=6.0, help="kbps: 6 = 8 levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if not args.manifest.exists():
        parser.error(f"{args.manifest} does not exist: build it with `studylib corpus --profile study` "
                     "or pass --manifest")

    start = time.perf_counter()
    model = build_model(args.seed)
    encoder, frame_rate = model.encoder.eval(), model.frame_rate
    train = AudioDataset(args.manifest, "train", segment_seconds=1.0, seed=args.seed)
    crops = []
    for epoch in range(-(-args.pool // len(train))):  # random 1 s crops, a pure function of (seed, epoch, item)
        train.set_epoch(epoch)
        crops += [train[i] for i in range(min(len(train), args.pool - len(crops)))]
    valid = AudioDataset(args.manifest, "valid", segment_seconds=1.0)
    picks = np.linspace(0, len(valid) - 1, min(args.held_out, len(valid))).round().astype(int)
    pool, held_out = encode(encoder, crops), encode(encoder, [valid[int(i)] for i in picks])
    print(f"encoded {len(crops)} training crops and {len(picks)} held-out windows "
          f"({held_out.shape[0] * held_out.shape[2]} frames) in {time.perf_counter() - start:.0f} s")

    build_quantizer = audiocraft_quantizer if args.audiocraft else encodec_quantizer
    results = {}
    for arm, expiry in ARMS.items():
        arm_start = time.perf_counter()
        quantizer = build_quantizer(args.seed, frame_rate, args.bandwidth)
        replaced = patch_codebooks(quantizer.module, expiry=expiry)  # <- the fix (or, for `upstream`, as released)
        batches = torch.Generator().manual_seed(args.seed)  # the same batches for every arm
        torch.manual_seed(args.seed + 1)  # the codebooks draw from the global RNG, as EnCodec's
        # Before: k-means on the first batch (run by the first forward, here without an EMA step).
        quantizer.module.eval()
        quantizer.step(pool[torch.randint(len(pool), (args.batch,), generator=batches)])
        before = held_out_stats(quantizer, held_out)
        quantizer.module.train()
        for _ in range(args.steps):
            quantizer.step(pool[torch.randint(len(pool), (args.batch,), generator=batches)])
        quantizer.module.eval()
        after = held_out_stats(quantizer, held_out)
        layers = quantizer.module.vq.layers[:quantizer.levels]
        codes_replaced = sum(int(layer._codebook.replaced_total) for layer in layers)
        results[arm] = {"before": before, "after": after, "replaced": codes_replaced}
        print(f"{arm}: patched {replaced} codebooks of {type(quantizer.module).__module__}, {args.steps} steps in "
              f"{time.perf_counter() - arm_start:.0f} s, codes replaced {codes_replaced:,}")

    levels = len(results["upstream"]["before"][0])
    print(f"\nheld-out usage per level (fraction of {quantizer.module.bins} codes used), "
          f"before = after k-means on the first batch, after = {args.steps} steps of {args.batch * frame_rate} frames")
    print("| level | " + " | ".join(f"{arm} before | {arm} after" for arm in results) + " |")
    print("|---" * (1 + 2 * len(results)) + "|")
    for level in range(levels):
        cells = [f"{r[when][0][level]:.3f}" for r in results.values() for when in ("before", "after")]
        print(f"| {level} | " + " | ".join(cells) + " |")
    means = [f"{np.mean(r[when][0]):.3f}" for r in results.values() for when in ("before", "after")]
    print("| mean | " + " | ".join(means) + " |")
    snrs = [f"{r[when][1]:.2f}" for r in results.values() for when in ("before", "after")]
    print("| SNR (dB) | " + " | ".join(snrs) + " |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; `upstream` trains bit-identically to the unpatched model "
          f"(tests/{'test_patch_audiocraft' if args.audiocraft else 'test_patch'}.py), so it stands for the quantizer "
          "as released")


if __name__ == "__main__":
    main()
