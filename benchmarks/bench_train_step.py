"""Benchmark of the cpu recipe's whole training step (`studylib.train.train_step`: forward, mel + L1 + -SI-SDR
through the balancer, commitment, backward, Adam), as it is now against the same step with the two pieces this
study sped up put back as they were (torchaudio's `MelSpectrogram` for the mel loss, `F.pad(mode="reflect")` in
every conv): the ratio says what the speed-up buys. Same weights, same batches, interleaved rounds, median.

Then throughput on the machine's cores: one process with all threads against one single-thread process per
core at once (what `studylib study --jobs N` does), in steps per second summed over processes.

    python benchmarks/bench_train_step.py [--repeats 15] [--out results/bench_train_step.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio

from studylib import codec as codec_module
from studylib import config as cfglib
from studylib.train import TrainConfig, build_parts, train_step

ROOT = Path(__file__).resolve().parents[1]
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)


class TorchaudioMelLoss(torch.nn.Module):
    """The mel loss as it was: torchaudio's MelSpectrogram per scale, both signals with autograd, all bands."""

    def __init__(self, sample_rate: int = 24_000, scales: tuple[int, ...] = tuple(range(5, 12)), n_mels: int = 64):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.mels = torch.nn.ModuleList(torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=2**i, win_length=2**i, hop_length=2**i // 4, n_mels=n_mels,
                power=1.0, normalized=False, center=True, pad_mode="reflect") for i in scales)

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        total = estimate.new_zeros(())
        for mel in self.mels:
            s_est, s_ref = mel(estimate.float()), mel(reference.float())
            log_diff = torch.log10(s_est.clamp_min(1e-5)) - torch.log10(s_ref.clamp_min(1e-5))
            total = total + (s_est - s_ref).abs().mean() + log_diff.abs().mean()
        return total / len(self.mels)


@contextlib.contextmanager
def before_speedup():
    """F.pad's reflect padding in the codec, for the duration of the block."""
    saved = codec_module._reflect
    codec_module._reflect = lambda x, left, right: F.pad(x, (left, right), mode="reflect")
    try:
        yield
    finally:
        codec_module._reflect = saved


def recipe_config(arm: str = "none") -> TrainConfig:
    """The cpu scale's training config of one arm (params/scales/cpu.yaml + params/arms/<arm>.yaml)."""
    return cfglib.build(TrainConfig, [cfglib.read_overlay(ROOT / "params/scales/cpu.yaml"),
                                      cfglib.read_overlay(ROOT / f"params/arms/{arm}.yaml")])


def step_times(repeats: int) -> dict[str, list[float]]:
    """Seconds per step, now and before, interleaved, every bandwidth in turn, after every level's k-means."""
    cfg = recipe_config()
    g = torch.Generator().manual_seed(0)
    batches = [0.1 * torch.randn(cfg.batch_size, 1, int(cfg.segment_seconds * 24_000), generator=g)
               for _ in range(repeats)]
    parts = {"now": build_parts(cfg, torch.device("cpu")), "before": build_parts(cfg, torch.device("cpu"))}
    parts["before"].mel_loss = TorchaudioMelLoss()
    for name, p in parts.items():  # warm-up: k-means of every level (the 24 kbps step uses all 32)
        with before_speedup() if name == "before" else contextlib.nullcontext():
            train_step(p, cfg, batches[0], 24.0, 0)
    times: dict[str, list[float]] = {"now": [], "before": []}
    for i, wav in enumerate(batches):
        for name in (("now", "before") if i % 2 == 0 else ("before", "now")):
            with before_speedup() if name == "before" else contextlib.nullcontext():
                t0 = time.perf_counter()
                train_step(parts[name], cfg, wav, BANDWIDTHS[i % len(BANDWIDTHS)], i + 1)
                times[name].append(time.perf_counter() - t0)
    return times


def throughput_worker(steps: int) -> float:
    """Steps per second of `steps` training steps in this process (after warm-up)."""
    cfg = recipe_config()
    parts = build_parts(cfg, torch.device("cpu"))
    wav = 0.1 * torch.randn(cfg.batch_size, 1, 24_000, generator=torch.Generator().manual_seed(0))
    train_step(parts, cfg, wav, 24.0, 0)
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(parts, cfg, wav, BANDWIDTHS[i % len(BANDWIDTHS)], i + 1)
    return steps / (time.perf_counter() - t0)


def throughput(steps: int, processes: int, threads: int) -> float:
    """Summed steps per second of `processes` concurrent workers with `threads` torch threads each."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", str(steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="timed steps per implementation")
    p.add_argument("--throughput-steps", type=int, default=20, help="steps per process in the throughput test")
    p.add_argument("--out", type=Path, default=None, help="CSV to write the figures to")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)  # denormals made CPU steps vary 0.6-14 s on this machine
    if args.worker is not None:
        print(json.dumps({"steps_per_s": throughput_worker(args.worker)}))
        return 0
    cores = os.cpu_count() or 1
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.processor() or platform.machine()}, {cores} cores"
    print(f"# bench_train_step  {when}  {machine}  torch {torch.__version__}")
    times = step_times(args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\ncpu recipe training step (small codec, 8 x 1 s, bandwidths cycled), {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, t in med.items():
        print(f"  {name:<7} {t:.3f} s/step")
    ratio = med["now"] / med["before"]
    print(f"  now / before = {ratio:.3f}")
    single = throughput(args.throughput_steps, 1, cores)
    spread = throughput(args.throughput_steps, cores, 1)
    print(f"\nthroughput, {args.throughput_steps} steps per process: 1 process x {cores} threads {single:.2f} steps/s; "
          f"{cores} processes x 1 thread {spread:.2f} steps/s (ratio {spread / single:.2f})")
    if args.out:
        import pandas as pd

        rows = [{"what": f"step_{name}", "value": t, "unit": "s/step"} for name, t in med.items()]
        rows += [{"what": "step_now_over_before", "value": ratio, "unit": "ratio"},
                 {"what": f"throughput_1x{cores}_threads", "value": single, "unit": "steps/s"},
                 {"what": f"throughput_{cores}x1_thread", "value": spread, "unit": "steps/s"}]
        write_csv(pd.DataFrame(rows), args.out, args.repeats, when, machine)
    return 0


def write_csv(df, out: Path, repeats: int, when: str, machine: str) -> None:
    """The figures, with how many repeats, when and on what they were measured."""
    df["repeats"], df["date"], df["machine"] = repeats, when, machine
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
