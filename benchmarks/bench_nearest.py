"""The codebook lookup in row blocks vs in one call: same bits, how much faster, on this machine, one thread.

`EuclideanCodebook.quantize` (studylib.quantizers.exact.nearest_codes) computes the [n, K] distances in blocks of 128
rows where n x K is large, so each block is still in cache when argmin reads it. This prints, for the
quantizer-only map's shapes (600 / 4,800 frames, K = 1,024 / 4,096 / 16,384) and both distance expressions
(EnCodec's, used by `none`/`upstream`; addmm, used by `fixed`), the median time of the one-call expression
and of ours, their ratio, and whether the codes are identical.

    python benchmarks/bench_nearest.py [--rounds 5] [--out results/bench_nearest.csv]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from studylib.quantizers.ema import EuclideanCodebook, ExpiryConfig

DIM = 128
SHAPES = [(600, 1024), (600, 4096), (4800, 4096), (600, 16384), (4800, 16384)]


def one_call(book: EuclideanCodebook, x: torch.Tensor) -> torch.Tensor:
    """The lookup as it was written before the blocks: the whole [n, K] matrix, then argmin."""
    embed_t = book.embed.t()
    sq_e = embed_t.pow(2).sum(0, keepdim=True)
    if book.reference_arithmetic:
        return (x @ (-2 * book.embed).t()).add_(x.pow(2).sum(1, keepdim=True)).add_(sq_e).argmin(dim=-1)
    return torch.addmm(sq_e, x, embed_t, alpha=-2.0).argmin(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="CSV to write the rows to")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, bins in SHAPES:
        for mode in ("none", "fixed"):
            book = EuclideanCodebook(DIM, bins, kmeans_init=False, expiry=ExpiryConfig(mode=mode))
            book.embed.copy_(torch.randn(bins, DIM, generator=g))
            x = torch.randn(n, DIM, generator=g)
            same = torch.equal(book.quantize(x), one_call(book, x))  # also runs the once-per-shape check
            times = {"one_call": [], "blocks": []}
            for _ in range(args.rounds):  # interleaved: drift on a shared machine hits both alike
                for name in ("one_call", "blocks"):
                    start = time.perf_counter()
                    one_call(book, x) if name == "one_call" else book.quantize(x)
                    times[name].append(time.perf_counter() - start)
            one, ours = statistics.median(times["one_call"]), statistics.median(times["blocks"])
            rows.append({"frames": n, "bins": bins, "expression": "encodec" if book.reference_arithmetic else "addmm",
                         "one_call_ms": round(one * 1e3, 2), "blocks_ms": round(ours * 1e3, 2),
                         "speedup": round(one / ours, 2), "same_codes": same})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"{datetime.now(UTC):%Y-%m-%d}\n{table.to_string(index=False)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
