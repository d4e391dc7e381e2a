"""Probe of how `none`'s single codebook comes alive on frozen latents: the codes k-means leaves empty are parked
far out and fall into the data as the EMA decays.

EnCodec's k-means runs on the first batch (600 frames), so with K > 600 at least K - 600 codes get no frame. Their
`embed_avg` holds a frame (k-means' mean, stored as a mean: the init bug) and their `cluster_size` 0, so
`embed = embed_avg / smoothed count` puts them at ~1/epsilon (1e5) times a frame: never the nearest code. Each step
the EMA multiplies both by the decay (0.99); the Laplace-smoothed count stops shrinking at epsilon, so the code
shrinks by 0.99 a step and reaches the data's scale after about ln(1e5) / ln(1 / 0.99) ~ 1,150 steps, whatever K.
Those it passes close to frames on the way are caught; the rest shrink on towards the origin. This prints, every
few steps of a `none` quantizer-only run (the regime map's setup, studylib.training.latents), the median norm of the
codes
that k-means left empty, the share of them used on held-out frames and the codebook's usage.
results/README.md section 12 quotes its output.

    python benchmarks/probe_parked_codes.py results/regimes/runs/none-60cda02ae4-s0/latents.pt [--bins 4096]
        [--frames-per-step 600] [--steps 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from studylib.quantizers.ema import ResidualVectorQuantizer
from studylib.training.latents import Latents, expand_grid

ROOT = Path(__file__).resolve().parents[1]
REPORT_AT = (1, 250, 500, 750, 1000, 1100, 1150, 1200, 1300, 1500, 2000, 3000, 5000, 10000)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("latents", help="a latents.pt (studylib latents RUN)")
    parser.add_argument("--bins", type=int, default=4096)
    parser.add_argument("--frames-per-step", type=int, default=600)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=20_000, help="valid frames the usage is measured on")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)

    latents = Latents.load(args.latents)
    (cell,) = expand_grid([{"arm": "none", "bins": args.bins, "frames_per_step": args.frames_per_step}],
                          ROOT / "params" / "arms", {"n_q": 1, "seeds": [args.seed]})
    c = cell.config
    rvq = ResidualVectorQuantizer(dimension=latents.frames["train"].shape[1], n_q=1, bins=c.bins, decay=c.decay,
                                  kmeans_iters=c.kmeans_iters, expiry=c.expiry(), init_fix=c.init_fix,
                                  generator=torch.Generator().manual_seed(c.seed))
    draws = torch.Generator().manual_seed(c.seed + 1)  # the batches train_on_latents draws
    train, window = latents.frames["train"], torch.arange(c.crop_frames)
    held = latents.frames["valid"][: args.held_out].t()[None]  # [1, D, N]
    print(f"latents {args.latents}: frame norm median {train[:20_000].norm(dim=1).median():.3g}; K = {c.bins}, "
          f"{c.frames_per_step} frames per step, decay {c.decay}")
    empty = None
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, train.shape[0] - c.crop_frames + 1, (c.frames_per_step // c.crop_frames, 1),
                               generator=draws)
        rvq.train()(train[starts + window].transpose(1, 2), latents.frame_rate)
        codebook = rvq.codebooks[0]
        if empty is None:  # after k-means and the first EMA step: the codes no frame was assigned to
            empty = codebook.cluster_size < 1e-12
            print(f"k-means left {int(empty.sum())} of {c.bins} codes without a frame")
        if step in REPORT_AT or step == args.steps:
            codes = rvq.eval().encode(held, latents.frame_rate)[0].flatten()
            caught = torch.isin(torch.nonzero(empty).flatten(), codes).float().mean()
            print(f"step {step:>6}: those codes' norm median {codebook.embed[empty].norm(dim=1).median():10.3g}, "
                  f"used on held-out {caught:.2f}; codebook usage {codes.unique().numel() / c.bins:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
