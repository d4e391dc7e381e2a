"""Fix your own EnCodec-style codec: patch the `encodec` package's model and train its quantizer.

The three lines a training script adds (after building / loading the model, before DDP):

    from studylib import ExpiryConfig, patch_codebooks
    patch_codebooks(model, expiry=ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5))
    ...  # state dicts stay EnCodec's; `unpatch_codebooks(model)` before pickling whole modules

This script builds `EncodecModel.encodec_model_24khz(pretrained=False)` (no download), freezes its encoder,
and trains only the quantizer (EMA codebooks need no optimizer) on the study corpus at EnCodec's per-GPU
regime: 8 x 1 s = 600 frames per step, 1024 codes, 8 levels (6 kbps). It does so twice, patched with
`upstream` (EnCodec as released, bit for bit, bug included) and with `fixed`, and prints per level the
fraction of the 1024 codes that held-out frames use, before training (right after k-means on the first
batch) and after it, plus the held-out SNR of the quantized latents.

Mind the horizon: at decay 0.99 a relative threshold of 0.1 flags a code only after about 229 steps
without use (codes left empty by the k-means are flagged at the first check), so run a few hundred steps;
over a few dozen steps a correct expiry can look no better than EnCodec's.

    python examples/fix_your_codec.py [--manifest data/study/manifest.csv] [--steps 400]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from studylib import ExpiryConfig, patch_codebooks
from studylib.data import AudioDataset

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


@torch.no_grad()
def held_out_stats(quantizer, latents: torch.Tensor, frame_rate: int, bandwidth: float) -> tuple[list, float]:
    """Per level, the fraction of codes that the held-out frames use; SNR (dB) of the quantized latents."""
    codes = quantizer.encode(latents, frame_rate, bandwidth)  # [n_q, B, T]
    usage = [codes[level].unique().numel() / quantizer.bins for level in range(codes.shape[0])]
    error = latents - quantizer.decode(codes)
    snr = 10 * torch.log10(latents.var() / error.pow(2).mean())
    return usage, float(snr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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

    results = {}
    for arm, expiry in ARMS.items():
        arm_start = time.perf_counter()
        model = build_model(args.seed)
        replaced = patch_codebooks(model, expiry=expiry)  # <- the fix (or, for `upstream`, EnCodec as is)
        quantizer = model.quantizer
        batches = torch.Generator().manual_seed(args.seed)  # the same batches for every arm
        torch.manual_seed(args.seed + 1)  # the codebooks draw from the global RNG, as EnCodec's
        # Before: k-means on the first batch (run by the first forward, here without an EMA step).
        quantizer.eval()(pool[torch.randint(len(pool), (args.batch,), generator=batches)], frame_rate,
                         args.bandwidth)
        before = held_out_stats(quantizer, held_out, frame_rate, args.bandwidth)
        quantizer.train()
        for _ in range(args.steps):
            quantizer(pool[torch.randint(len(pool), (args.batch,), generator=batches)], frame_rate, args.bandwidth)
        after = held_out_stats(quantizer.eval(), held_out, frame_rate, args.bandwidth)
        levels = quantizer.get_num_quantizers_for_bandwidth(frame_rate, args.bandwidth)
        codes_replaced = sum(int(layer._codebook.replaced_total) for layer in quantizer.vq.layers[:levels])
        results[arm] = {"before": before, "after": after, "replaced": codes_replaced}
        print(f"{arm}: patched {replaced} codebooks, {args.steps} steps in {time.perf_counter() - arm_start:.0f} s, "
              f"codes replaced {codes_replaced:,}")

    levels = len(results["upstream"]["before"][0])
    print(f"\nheld-out usage per level (fraction of {model.quantizer.bins} codes used), "
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
          "(tests/test_patch.py), so it stands for EnCodec as released")


if __name__ == "__main__":
    main()
