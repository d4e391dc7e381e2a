"""Where the cpu recipe's training step spends its time: `torch.profiler` over a few steps of
`studylib.training.train.train_step` (one thread, after warm-up), grouped into the parts the speed work looked at
(convolutions, elementwise work, the mel loss's FFTs, the LSTM, the quantizer, the optimizer, copies), plus the
top operators by self time and, for any convolution that leaves oneDNN (`_slow_conv2d`), its input shapes.

    python benchmarks/profile_train_step.py [--steps 5] [--arm none] [--setting fp32|today] [--top 25]

Shares of self CPU time are what to read; absolute times depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import collections
import types

import torch
from bench_train_step import BANDWIDTHS, recipe_config
from torch.profiler import ProfilerActivity, profile

from studylib.training.train import build_parts, train_step

# operator-name fragments -> the part of the step they belong to (first match wins)
GROUPS = (
    ("LSTM", ("lstm", "rnn")),
    ("convolution", ("conv", "mkldnn")),
    ("mel loss (FFT, fold, pad)", ("fft", "stft", "fold", "im2col", "col2im", "reflection_pad", "_mel")),
    ("quantizer (cdist, argmin, index, EMA)", ("cdist", "argmin", "argmax", "index", "scatter", "embedding",
                                               "bincount", "one_hot", "addmm_", "_weight_norm")),
    ("optimizer (Adam)", ("adam", "_foreach")),
    ("copies and layout", ("copy", "contiguous", "clone", "cat", "stack", "transpose", "permute", "_to_copy")),
    ("matmul", ("mm", "matmul", "linear", "bmm")),
    ("elementwise and reductions", ("elu", "mul", "add", "sub", "div", "abs", "sgn", "pow", "sqrt", "log", "exp",
                                    "sum", "mean", "norm", "where", "clamp", "neg", "max", "min", "sign",
                                    "threshold", "fill", "zero")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps after 3 warm-up steps (default 5)")
    parser.add_argument("--arm", default="none", help="arm of params/arms (default none)")
    parser.add_argument("--setting", default="fp32", choices=("fp32", "today"),
                        help="fp32: the step as it is; today: the mel loss through autograd, as before 2026-12-03")
    parser.add_argument("--top", type=int, default=25, help="operators listed (default 25)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = recipe_config(args.arm, "fp32")
    parts = build_parts(cfg, torch.device("cpu"))
    if args.setting == "today":
        parts.mel_loss.forward = types.MethodType(lambda self, e, r: self.autograd_loss(e, r), parts.mel_loss)
    g = torch.Generator().manual_seed(0)
    batches = [0.1 * torch.randn(cfg.batch_size, 1, int(cfg.segment_seconds * 24_000), generator=g)
               for _ in range(3)]
    for i in range(3):  # k-means of every level, allocator warm-up
        train_step(parts, cfg, batches[i], BANDWIDTHS[-1 - i], i)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(args.steps):
            train_step(parts, cfg, batches[i % 3], BANDWIDTHS[i % len(BANDWIDTHS)], 3 + i)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_group: dict[str, float] = collections.defaultdict(float)
    for e in events:
        by_group[group_of(e.key)] += e.self_cpu_time_total
    print(f"{args.steps} steps, arm {args.arm}, setting {args.setting}, 1 thread: "
          f"{total / 1e6 / args.steps:.3f} s of operator self time per step")
    print("\nshare of self CPU time by part of the step:")
    for group, t in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<40s} {100 * t / total:5.1f} %")
    print(f"\ntop {args.top} operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key:<45s} {100 * e.self_cpu_time_total / total:5.1f} %  calls/step {e.count / args.steps:7.1f}")
    slow = [e for e in prof.key_averages(group_by_input_shape=True) if "slow_conv" in e.key]
    print("\nconvolutions outside oneDNN (_slow_conv*):" + ("" if slow else " none"))
    for e in slow:
        print(f"  {e.key} shapes {e.input_shapes} calls/step {e.count / args.steps:.1f}")


if __name__ == "__main__":
    main()
