"""Quantizer benchmark: our RVQ vs encodec 0.1.1's, same machine, one run, ratios printed.

Training step: 8 levels, 600 frames x 128 dims (EnCodec's per-GPU regime: 8 x 1 s at 75 Hz), K = 1024,
after k-means init. Timed in interleaved rounds (each implementation once per round) and summarised
by the median, so drift on a shared machine hits both sides alike.
k-means init: 8 levels x 50 iterations, encodec's (materialises n x c x d) vs ours (matmul + exact
re-scoring of near-ties), with the final inertia of both.

    python benchmarks/bench_rvq.py [--rounds 30] [--out results/bench_rvq.csv]
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

from studylib.quantizers.ema import ExpiryConfig, ResidualVectorQuantizer, kmeans

N_Q, DIM, BINS, FRAMES, FRAME_RATE = 8, 128, 1024, 600, 75
BANDWIDTH = N_Q * 10 * FRAME_RATE / 1000  # 6 kbps = 8 levels


def make_data(steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # [B=8, D, T=75]: 600 frames; a scale mix so that the levels see residuals of different sizes.
    return [torch.randn(8, DIM, FRAMES // 8, generator=g) * (0.5 + torch.rand(1, generator=g))
            for _ in range(steps)]


def encodec_rvq() -> torch.nn.Module:
    from encodec.quantization.vq import ResidualVectorQuantizer as EncodecRVQ

    return EncodecRVQ(dimension=DIM, n_q=N_Q, bins=BINS, kmeans_init=True, kmeans_iters=1,
                      threshold_ema_dead_code=2)


def our_rvq(expiry: ExpiryConfig) -> torch.nn.Module:
    return ResidualVectorQuantizer(dimension=DIM, n_q=N_Q, bins=BINS, kmeans_iters=1, expiry=expiry,
                                   generator=torch.Generator().manual_seed(0))


ARMS = {
    "encodec": encodec_rvq,
    "upstream": lambda: our_rvq(ExpiryConfig(mode="upstream")),
    "none": lambda: our_rvq(ExpiryConfig(mode="none")),
    "fixed-abs2": lambda: our_rvq(ExpiryConfig(mode="fixed", threshold=2.0)),
    "fixed-rel0.1": lambda: our_rvq(ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative")),
}


def step(model: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    out = model(x, FRAME_RATE, BANDWIDTH)
    (out.quantized.square().mean() + out.penalty).backward()  # gradients flow as in a codec
    return time.perf_counter() - t0


def bench_steps(rounds: int) -> dict[str, float]:
    data = make_data(rounds + 3)
    models = {}
    for name, make in ARMS.items():
        torch.manual_seed(0)
        models[name] = make().train()
        for x in data[:3]:  # init (1-iteration k-means) and warm-up
            step(models[name], x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for x in data[3:]:
        for name, model in models.items():
            times[name].append(step(model, x))
    return {name: statistics.median(t) for name, t in times.items()}


def inertia(samples: torch.Tensor, means: torch.Tensor) -> float:
    return float(torch.cdist(samples.double(), means.double()).min(1).values.square().sum())


def bench_kmeans(levels: int, iters: int) -> dict[str, float]:
    from encodec.quantization.core_vq import kmeans as encodec_kmeans

    data = make_data(levels, seed=1)
    out = {"encodec_s": 0.0, "ours_s": 0.0, "encodec_inertia": 0.0, "ours_inertia": 0.0, "same": True}
    for x in data:
        samples = x.transpose(1, 2).reshape(-1, DIM)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        theirs, their_counts = encodec_kmeans(samples, BINS, iters)
        out["encodec_s"] += time.perf_counter() - t0
        torch.manual_seed(0)
        t0 = time.perf_counter()
        ours = kmeans(samples, BINS, iters)
        out["ours_s"] += time.perf_counter() - t0
        out["encodec_inertia"] += inertia(samples, theirs)
        out["ours_inertia"] += inertia(samples, ours.means)
        out["same"] &= torch.equal(theirs, ours.means) and torch.equal(their_counts, ours.counts)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30, help="timed training steps per implementation")
    p.add_argument("--kmeans-levels", type=int, default=8)
    p.add_argument("--kmeans-iters", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="CSV to write the figures to")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)  # denormals made CPU steps vary 0.6-14 s on this machine
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# bench_rvq  {when}  {machine}")

    med = bench_steps(args.rounds)
    rows = []
    print(f"\nRVQ training step, {N_Q} levels, {FRAMES} frames x {DIM}, K={BINS} (median of {args.rounds})")
    print(f"{'arm':<14}{'ms/step':>10}{'ours/encodec':>14}{'ours/none':>11}")
    for name, t in med.items():
        vs_enc = t / med["encodec"]
        vs_none = t / med["none"]
        print(f"{name:<14}{t * 1e3:>10.2f}{vs_enc:>14.3f}{vs_none:>11.3f}")
        rows.append({"what": f"step:{name}", "seconds": t, "ratio_vs_encodec": vs_enc, "ratio_vs_none": vs_none})

    km = bench_kmeans(args.kmeans_levels, args.kmeans_iters)
    speedup = km["encodec_s"] / km["ours_s"]
    inertia_ratio = km["ours_inertia"] / km["encodec_inertia"]
    print(f"\nk-means init, {args.kmeans_levels} levels x {args.kmeans_iters} iters, {FRAMES} x {DIM}, K={BINS}")
    print(f"encodec {km['encodec_s']:.2f} s   ours {km['ours_s']:.2f} s   encodec/ours {speedup:.1f}x")
    print(f"inertia ours/encodec {inertia_ratio:.4f}   identical means and counts: {km['same']}")
    rows.append({"what": "kmeans:encodec", "seconds": km["encodec_s"], "inertia": km["encodec_inertia"]})
    rows.append({"what": "kmeans:ours", "seconds": km["ours_s"], "inertia": km["ours_inertia"],
                 "ratio_vs_encodec": km["ours_s"] / km["encodec_s"]})

    fixed_vs_none = max(med["fixed-abs2"], med["fixed-rel0.1"]) / med["none"]
    worst = max(t / med["encodec"] for n, t in med.items() if n != "encodec")
    checks = {
        "every mode: ours/encodec <= 0.8": worst <= 0.8,
        "fixed-with-expiry/none <= 1.05": fixed_vs_none <= 1.05,
        "k-means encodec/ours >= 20": speedup >= 20,
        "k-means inertia ours <= 1.05x encodec": inertia_ratio <= 1.05,
    }
    print()
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    if args.out:
        import pandas as pd

        args.out.parent.mkdir(parents=True, exist_ok=True)
        df = pd.DataFrame(rows)
        df["date"], df["machine"] = when, machine
        df.to_csv(args.out, index=False)
        print(f"\nwrote {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
