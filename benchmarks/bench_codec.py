"""Codec benchmark: a training step of our `Codec` vs the `encodec` package's model of the same config.

Step: forward, L1 loss + commitment penalty, backward, Adam step; batch 8 x 1 s, all n_q levels, after
codebook init, both models holding the same weights and codebooks (ours is loaded from theirs).
EnCodec's `EncodecModel.forward` only encodes and decodes (no straight-through, no EMA), so its
training forward is composed here as EnCodec's training code does: encoder -> quantizer(train) ->
decoder. Timed in interleaved rounds (each implementation once per round, order alternating) and
summarised by the median, so drift on a shared machine hits both sides alike. On a CUDA machine the
official config is also timed on the GPU in fp32 and bf16 autocast.

    python benchmarks/bench_codec.py [--repeats 5] [--configs small,encodec_24khz]
                                     [--out results/bench_codec.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from studylib.model.codec import Codec, CodecConfig, full_precision

CONFIGS: dict[str, Callable[[], CodecConfig]] = {
    "tiny": CodecConfig.tiny,
    "small": CodecConfig.small,
    "encodec_24khz": CodecConfig.encodec_24khz,
}
BATCH, SECONDS = 8, 1.0


def encodec_reference(config: CodecConfig) -> torch.nn.Module:
    """The `encodec` package's EncodecModel with `config`'s architecture (upstream expiry only)."""
    from encodec import EncodecModel
    from encodec.modules import SEANetDecoder, SEANetEncoder
    from encodec.quantization import ResidualVectorQuantizer as EncodecRVQ

    expiry = config.expiry
    if expiry.mode != "upstream" or config.quantizer_dropout or config.detach_residual:
        raise ValueError("encodec has only upstream expiry, no quantizer dropout and no residual detach")
    seanet = dict(
        channels=config.channels, dimension=config.dimension, n_filters=config.n_filters,
        n_residual_layers=config.n_residual_layers, ratios=list(config.ratios), norm=config.norm,
        kernel_size=config.kernel_size, last_kernel_size=config.last_kernel_size,
        residual_kernel_size=config.residual_kernel_size, dilation_base=config.dilation_base,
        causal=config.causal, pad_mode=config.pad_mode, true_skip=config.true_skip,
        compress=config.compress, lstm=config.lstm_layers,
    )
    # kmeans_iters=1: the init is not what is timed, and encodec's k-means (n x K x D tensors) would take
    # minutes on CPU at 50 iterations.
    quantizer = EncodecRVQ(dimension=config.dimension, n_q=config.n_q, bins=config.bins, decay=config.decay,
                           kmeans_init=config.kmeans_init, kmeans_iters=1,
                           threshold_ema_dead_code=expiry.threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses torch's deprecated weight_norm
        return EncodecModel(SEANetEncoder(**seanet), SEANetDecoder(**seanet), quantizer,
                            list(config.target_bandwidths), config.sample_rate, config.channels)


def encodec_train_forward(model: torch.nn.Module, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio [B, C, T], penalty) from EnCodec's modules in training mode, all levels; the quantizer in
    float32 under autocast, as `Codec` runs it."""
    latent = model.encoder(wav).float()
    with full_precision(wav.device.type):
        q = model.quantizer(latent, model.frame_rate, None)
    return model.decoder(q.quantized)[..., : wav.shape[-1]], q.penalty


def codec_train_forward(model: Codec, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(wav)
    return out.audio, out.penalty


class Trainer:
    """One model, its optimiser and its forward; `step` times one training step."""

    def __init__(self, model: torch.nn.Module, forward: Callable, autocast: torch.dtype | None):
        self.model, self.forward, self.autocast = model.train(), forward, autocast
        self.opt = torch.optim.Adam(model.parameters(), lr=3e-4)

    def step(self, wav: torch.Tensor) -> float:
        cuda = wav.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx = torch.autocast(wav.device.type, self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            audio, penalty = self.forward(self.model, wav)
            loss = F.l1_loss(audio.float(), wav) + penalty
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def make_pair(config: CodecConfig, wav: torch.Tensor, device: str) -> dict[str, torch.nn.Module]:
    """encodec's model with initialised codebooks, and our codec holding the same state."""
    torch.manual_seed(0)
    theirs = encodec_reference(config).to(device).train()
    with torch.no_grad():  # codebook init: k-means on this batch's latents, and one EMA step
        theirs.quantizer(theirs.encoder(wav), theirs.frame_rate)
    ours = Codec.from_encodec(theirs.state_dict(), config).to(device)
    return {"ours": ours, "encodec": theirs}


def bench(config: CodecConfig, repeats: int, device: str,
          autocast: torch.dtype | None) -> dict[str, list[float]]:
    """Seconds per training step of each implementation, `repeats` interleaved rounds after a warm-up."""
    g = torch.Generator().manual_seed(0)
    batches = [0.1 * torch.randn(BATCH, config.channels, int(SECONDS * config.sample_rate), generator=g)
               for _ in range(repeats + 1)]
    batches = [b.to(device) for b in batches]
    models = make_pair(config, batches[0], device)
    trainers = {
        "ours": Trainer(models["ours"], codec_train_forward, autocast),
        "encodec": Trainer(models["encodec"], encodec_train_forward, autocast),
    }
    for trainer in trainers.values():  # warm-up: allocator, oneDNN/cuDNN plans
        trainer.step(batches[0])
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i, wav in enumerate(batches[1:]):
        for name in list(trainers)[:: 1 if i % 2 == 0 else -1]:  # alternate who goes first
            times[name].append(trainers[name].step(wav))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per implementation")
    p.add_argument("--configs", default="small,encodec_24khz", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--out", type=Path, default=None, help="CSV to write the figures to")
    args = p.parse_args(argv)
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or args.repeats < 1:
        p.error(f"--configs: unknown {unknown}, allowed {sorted(CONFIGS)}" if unknown else "--repeats >= 1")
    torch.set_flush_denormal(True)  # denormals made CPU steps vary 0.6-14 s on this machine
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# bench_codec  {when}  {cpu}  torch {torch.__version__}")

    runs = [(name, "cpu", "fp32", None) for name in names]
    if torch.cuda.is_available():
        print(f"# GPU: {torch.cuda.get_device_name()}")
        runs += [("encodec_24khz", "cuda", "fp32", None), ("encodec_24khz", "cuda", "bf16", torch.bfloat16)]
    else:
        print("# no CUDA device: GPU timings (official config, fp32 and bf16 autocast) skipped")

    rows = []
    print(f"\nTraining step (forward, L1 + penalty, backward, Adam), batch {BATCH} x {SECONDS:g} s, "
          f"all levels, median of {args.repeats}")
    print(f"{'config':<15}{'device':<7}{'prec':<6}{'impl':<9}{'s/step':>9}{'steps/s':>9}{'frames/s':>10}"
          f"{'ours/encodec':>14}")
    for name, device, precision, autocast in runs:
        config = CONFIGS[name]()
        times = bench(config, args.repeats, device, autocast)
        med = {impl: statistics.median(t) for impl, t in times.items()}
        frames = BATCH * round(SECONDS * config.frame_rate)  # latent frames per step
        for impl, t in med.items():
            ratio = t / med["encodec"]
            print(f"{name:<15}{device:<7}{precision:<6}{impl:<9}{t:>9.3f}{1 / t:>9.2f}{frames / t:>10.0f}"
                  f"{ratio:>14.3f}")
            rows.append({"config": name, "device": device, "precision": precision, "impl": impl,
                         "median_s": t, "min_s": min(times[impl]), "steps_per_s": 1 / t,
                         "frames_per_s": frames / t, "ratio_vs_encodec": ratio, "repeats": args.repeats})

    worst = max(r["ratio_vs_encodec"] for r in rows if r["impl"] == "ours")
    print(f"\n{'PASS' if worst <= 1.0 else 'FAIL'}  ours/encodec <= 1.0 everywhere (worst {worst:.3f})")
    if args.out:
        import pandas as pd

        args.out.parent.mkdir(parents=True, exist_ok=True)
        df = pd.DataFrame(rows)
        df["date"], df["machine"] = when, cpu
        df.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
