"""Benchmark of the cpu recipe's whole training step (`studylib.training.train.train_step`: forward, mel + L1 + -SI-SDR
through the balancer, commitment, backward, Adam) in every execution setting, as a ratio to the step as it was
before the speed work of 2026-12-03 (`today`: fp32, eager, the mel loss through torch.stft and autograd).

Each setting runs in its own process beside a `today` process, both with one thread, at the same time: how
`make study` runs codecs (two one-thread runs at a time on 2 cores), and fair to both, since they share the
machine's cores, caches and memory bandwidth. Each process warms up (k-means of every level, compilation),
waits for the other, then times `--steps` steps (bandwidths cycled; median) and keeps stepping untimed until
the other is done too, so neither runs alone while the other is timed.

    python benchmarks/bench_train_step.py [--steps 30] [--settings fp32 compile bf16 bf16+compile]
                                          [--throughput] [--out results/bench_train_step.csv]

bf16 settings need a CPU with native bfloat16 (avx512_bf16 / amx_bf16) and are skipped with a message
elsewhere. `--throughput` adds one process with all threads against one one-thread process per core: which of
the two finishes a pair of runs sooner (`--group official4096 --settings --throughput`: issue 38's question for the
official 24 kHz architecture at one level of 4096, its settings read from params/study.yaml's regimes group).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import torch

from studylib.core import config as cfglib
from studylib.training.run_config import TrainConfig
from studylib.training.train import build_parts, missing_cpu_bf16, train_step

ROOT = Path(__file__).resolve().parents[1]
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)
SETTINGS = {  # name: (bf16, compile, mel loss as before)
    "today": (False, False, True),
    "fp32": (False, False, False),
    "compile": (False, True, False),
    "bf16": (True, False, False),
    "bf16+compile": (True, True, False),
}


def group_overrides(group: str | None) -> dict:
    """The `set` of a codec group of params/study.yaml's regimes scale (e.g. official4096), or nothing."""
    if group is None:
        return {}
    groups = cfglib.read_overlay(ROOT / "params/study.yaml")["scales"]["regimes"]["codec"]["groups"]
    if group not in groups:
        raise SystemExit(f"--group: got {group!r}, allowed one of the regimes scale's groups: {', '.join(groups)}")
    return dict(groups[group].get("set") or {})


def recipe_config(arm: str = "none", setting: str = "fp32", group: str | None = None) -> TrainConfig:
    """The cpu scale's training config of one arm (params/scales/cpu.yaml + params/arms/<arm>.yaml), in a setting,
    with a regimes group's settings on top when one is named."""
    bf16, compile_, _ = SETTINGS[setting]
    return cfglib.build(TrainConfig, [cfglib.read_overlay(ROOT / "params/scales/cpu.yaml"),
                                      cfglib.read_overlay(ROOT / f"params/arms/{arm}.yaml"),
                                      {**group_overrides(group), "bf16": bf16, "compile": compile_}])


def worker(setting: str, steps: int, go: Path, stop: Path) -> dict:
    """Warm up, wait for `go`, time `steps` steps, keep stepping until `stop`; the median and all times."""
    cfg = recipe_config(setting=setting)
    parts = build_parts(cfg, torch.device("cpu"))
    if SETTINGS[setting][2]:  # the mel loss as it was: torch.stft through autograd
        parts.mel_loss.forward = types.MethodType(lambda self, e, r: self.autograd_loss(e, r), parts.mel_loss)
    g = torch.Generator().manual_seed(0)
    batches = [0.1 * torch.randn(cfg.batch_size, 1, int(cfg.segment_seconds * 24_000), generator=g)
               for _ in range(5)]
    for i in range(3):  # k-means of every level (the 24 kbps step uses all 32), compilation
        train_step(parts, cfg, batches[i], BANDWIDTHS[-1 - i], i)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.05)
    times, i = [], 3
    while len(times) < steps or not stop.exists():
        t0 = time.perf_counter()
        train_step(parts, cfg, batches[i % len(batches)], BANDWIDTHS[i % len(BANDWIDTHS)], i)
        if len(times) < steps:
            times.append(time.perf_counter() - t0)
            if len(times) == steps:
                print("done", flush=True)
        i += 1
    return {"setting": setting, "median": statistics.median(times), "times": times}


def side_by_side(settings: tuple[str, str], steps: int) -> list[dict]:
    """Run two settings at once, one thread each (see the module docstring); their results."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        go, stop = Path(tmp) / "go", Path(tmp) / "stop"
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", name, "--steps", str(steps), "--flags", tmp],
                                  stdout=subprocess.PIPE, text=True, env=env) for name in settings]
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a worker failed before its timed steps: {proc.communicate()}")
        go.touch()
        for proc in procs:
            proc.stdout.readline()  # "done"
        stop.touch()
        return [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]


def throughput_worker(steps: int, group: str | None = None) -> float:
    """Steps per second of `steps` training steps in this process (after warm-up)."""
    cfg = recipe_config(group=group)
    parts = build_parts(cfg, torch.device("cpu"))
    wav = 0.1 * torch.randn(cfg.batch_size, 1, 24_000, generator=torch.Generator().manual_seed(0))
    bandwidths = tuple(cfg.target_bandwidths) if cfg.target_bandwidths else BANDWIDTHS
    train_step(parts, cfg, wav, bandwidths[-1], 0)
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(parts, cfg, wav, bandwidths[i % len(bandwidths)], i + 1)
    return steps / (time.perf_counter() - t0)


def throughput(steps: int, processes: int, threads: int, group: str | None = None) -> float:
    """Summed steps per second of `processes` concurrent workers with `threads` torch threads each."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--throughput-worker", str(steps), *(["--group", group] if group else [])]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per process (median)")
    p.add_argument("--settings", nargs="*", default=["fp32", "compile", "bf16", "bf16+compile"],
                   choices=[s for s in SETTINGS if s != "today"], help="settings to time against `today`")
    p.add_argument("--throughput", action="store_true", help="also: 1 process x all threads vs 1 per core")
    p.add_argument("--throughput-steps", type=int, default=20, help="steps per process in the throughput test")
    p.add_argument("--group", default=None, help="the throughput test on a regimes codec group's settings "
                   "(e.g. official4096: the official 24 kHz architecture, one level of 4096)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write the figures to")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--flags", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--throughput-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)  # denormals made CPU steps vary 0.6-14 s on this machine
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.steps, args.flags / "go", args.flags / "stop")))
        return 0
    if args.throughput_worker is not None:
        print(json.dumps({"steps_per_s": throughput_worker(args.throughput_worker, args.group)}))
        return 0
    group_overrides(args.group)  # a group that is not there: one line, before any worker starts
    cores = os.cpu_count() or 1
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.processor() or platform.machine()}, {cores} cores"
    print(f"# bench_train_step  {when}  {machine}  torch {torch.__version__}")
    print(f"cpu recipe training step (small codec, 8 x 1 s, bandwidths cycled), 1 thread per process, each setting "
          f"beside `today` at the same time, median of {args.steps} steps after warm-up")
    rows = []
    missing = missing_cpu_bf16()
    for setting in args.settings:
        if SETTINGS[setting][0] and missing:
            print(f"  {setting:<13} skipped: this CPU has no native bfloat16 ({missing})")
            continue
        ours, peer = side_by_side((setting, "today"), args.steps)
        ratio = ours["median"] / peer["median"]
        print(f"  {setting:<13} {ours['median']:.3f} s/step   today beside it {peer['median']:.3f} s/step   "
              f"ratio {ratio:.3f}")
        rows += [{"what": f"step_{setting}", "value": ours["median"], "unit": "s/step"},
                 {"what": f"step_today_beside_{setting}", "value": peer["median"], "unit": "s/step"},
                 {"what": f"{setting}_over_today", "value": ratio, "unit": "ratio"}]
    if args.throughput:
        single = throughput(args.throughput_steps, 1, cores, args.group)
        spread = throughput(args.throughput_steps, cores, 1, args.group)
        tag = f"_{args.group}" if args.group else ""
        print(f"\nthroughput{f' ({args.group})' if args.group else ''}, {args.throughput_steps} steps per process: "
              f"1 process x {cores} threads {single:.2f} steps/s; {cores} processes x 1 thread {spread:.2f} steps/s "
              f"(ratio {spread / single:.2f}: above 1, runs side by side finish a pair sooner)")
        rows += [{"what": f"throughput{tag}_1x{cores}_threads", "value": single, "unit": "steps/s",
                  "repeats": args.throughput_steps},
                 {"what": f"throughput{tag}_{cores}x1_thread", "value": spread, "unit": "steps/s",
                  "repeats": args.throughput_steps}]
    if args.out and rows:
        import pandas as pd

        write_csv(pd.DataFrame(rows), args.out, args.steps, when, machine)
    return 0


def write_csv(df, out: Path, repeats: int, when: str, machine: str) -> None:
    """The figures, with how many timed steps (repeats), when and on what they were measured."""
    df["repeats"] = df["repeats"].fillna(repeats).astype(int) if "repeats" in df else repeats  # timed steps per row
    df["date"], df["machine"] = when, machine
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
