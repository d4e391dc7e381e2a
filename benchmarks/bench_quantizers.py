"""Benchmark of what each quantizer arm costs per training step: the cpu recipe's whole step
(`studylib.training.train.train_step`: forward, losses through the balancer, penalty, backward, Adam) of the small
codec with
the quantizer of arm `none` (our EMA RVQ, no expiry), `dac` (studylib.quantizers.factorized), `simvq` and `vqtorch`
(studylib.quantizers.peer), on the same batches, bandwidths cycled (1.5 to 24 kbps), in interleaved rounds (each arm
once per
round, the order rotating) after a warm-up step at 24 kbps (the EMA arms' k-means of all 32 levels); medians, and
each arm's ratio to `none`: the step cost that issue 20's comparison reports beside the quality.

    python benchmarks/bench_quantizers.py [--repeats 10] [--arms none dac simvq vqtorch] [--out results/x.csv]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from bench_train_step import BANDWIDTHS, recipe_config, write_csv

from studylib.training.train import build_parts, train_step


def step_times(arms: list[str], repeats: int) -> dict[str, list[float]]:
    """Seconds per training step of each arm, interleaved."""
    configs = {arm: recipe_config(arm) for arm in arms}
    first = configs[arms[0]]
    g = torch.Generator().manual_seed(0)
    batches = [0.1 * torch.randn(first.batch_size, 1, int(first.segment_seconds * 24_000), generator=g)
               for _ in range(repeats)]
    parts = {arm: build_parts(cfg, torch.device("cpu")) for arm, cfg in configs.items()}
    for arm in arms:  # warm-up: k-means of every level for the EMA arms (the 24 kbps step uses all 32)
        train_step(parts[arm], configs[arm], batches[0], 24.0, 0)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for i, wav in enumerate(batches):
        for arm in arms[i % len(arms):] + arms[: i % len(arms)]:
            t0 = time.perf_counter()
            train_step(parts[arm], configs[arm], wav, BANDWIDTHS[i % len(BANDWIDTHS)], i + 1)
            times[arm].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per arm")
    p.add_argument("--arms", nargs="+", default=["none", "dac", "simvq", "vqtorch"], help="params/arms names; the "
                   "first is the reference of the ratios")
    p.add_argument("--out", type=Path, default=None, help="CSV to write the figures to")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)  # denormals made CPU steps vary 0.6-14 s on this machine
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# bench_quantizers  {when}  {machine}  torch {torch.__version__}")
    times = step_times(args.arms, args.repeats)
    med = {arm: statistics.median(t) for arm, t in times.items()}
    reference = args.arms[0]
    print(f"\ncpu recipe training step (small codec, 8 x 1 s, bandwidths cycled), median of {args.repeats}")
    for arm, t in med.items():
        print(f"  {arm:<8} {t:.3f} s/step   x{t / med[reference]:.3f} of {reference}")
    if args.out:
        import pandas as pd

        write_csv(pd.DataFrame([{"arm": arm, "s_per_step": t, f"ratio_to_{reference}": t / med[reference]}
                                for arm, t in med.items()]), args.out, args.repeats, when, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
