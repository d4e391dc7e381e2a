"""Probe of how `quantizer: dac` starts on the cpu recipe: DAC's own quantizer init against the unit-gain one
(studylib.quantizers.factorized), everything else as `params/scales/cpu.yaml` + `params/arms/dac.yaml`.

Every `--every` steps, on 16 fixed validation windows: how much the encoder's latent frames still point in different
directions (mean cosine to their mean direction, and the spread: RMS distance to the mean / RMS norm), their
norm, the distinct level-0 codes, and SI-SDR at 6 kbps; beside the step's penalty, L1 and mel loss. A collapse
reads as cosine -> 1, spread -> 0 and one level-0 code. results/README.md section 11 quotes its output.

    python benchmarks/probe_dac_init.py [--init dac unit_gain] [--steps 100] [--seed 0] [--set weight_commit=0.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from studylib.core import config as cfglib
from studylib.model import codec as codeclib
from studylib.model.metrics import si_sdr
from studylib.training.data import AudioDataset
from studylib.training.run_config import TrainConfig
from studylib.training.train import _train_batch, build_parts, train_step

ROOT = Path(__file__).resolve().parents[1]
PROBE_STEPS = (2, 5, 10, 20, 50)


def with_quantizer_init(init: str):
    """`build_quantizer`'s DAC quantizer, with its `init` forced (the codec's encoder and decoder keep theirs)."""
    original = codeclib.FactorizedResidualVQ
    return lambda **kwargs: original(**{**kwargs, "init": init})


@torch.no_grad()
def probe(model: codeclib.Codec, wav: torch.Tensor) -> dict[str, float]:
    model.eval()
    latent = model.encoder(wav)  # [B, D, T]
    frames = latent.transpose(1, 2).reshape(-1, latent.shape[1])  # [B T, D]
    centred = frames - frames.mean(0)
    codes = model.quantizer.encode(latent, model.config.frame_rate, 6.0)  # [n_q, B, T]
    out = model(wav, 6.0)
    model.train()
    return {
        "cos_to_mean": float(torch.nn.functional.cosine_similarity(frames, frames.mean(0, keepdim=True)).mean()),
        "spread": float(centred.square().sum(1).mean().sqrt() / frames.square().sum(1).mean().sqrt()),
        "latent_norm": float(frames.norm(dim=1).mean()),
        "distinct_l0": int(codes[0].unique().numel()),
        "si_sdr_6kbps": float(si_sdr(out.audio, wav).mean()),
    }


def run(init: str, steps: int, seed: int, sets: list[str], every: int) -> None:
    cfg = cfglib.load(TrainConfig, [ROOT / "params/scales/cpu.yaml", ROOT / "params/arms/dac.yaml"],
                      [f"seed={seed}", f"manifest={ROOT / 'data/study/manifest.csv'}", *sets])
    original = codeclib.FactorizedResidualVQ
    codeclib.FactorizedResidualVQ = with_quantizer_init(init)
    try:
        parts = build_parts(cfg, torch.device("cpu"))
    finally:
        codeclib.FactorizedResidualVQ = original
    train = AudioDataset(cfg.manifest, "train", cfg.segment_seconds, cfg.codec_config().sample_rate, seed=cfg.seed)
    valid = AudioDataset(cfg.manifest, "valid", cfg.segment_seconds, cfg.codec_config().sample_rate)
    windows = torch.stack([valid[i] for i in range(16)])
    print(f"init {init}, seed {seed}, {' '.join(sets) or 'the cpu recipe'}")
    print(f"{'step':>5} {'cos_to_mean':>11} {'spread':>6} {'|latent|':>8} {'codes_l0':>8} {'SI-SDR':>7} "
          f"{'penalty':>9} {'l1':>6} {'mel':>6}")

    def line(step: int, scalars: dict | None) -> None:
        p = probe(parts.model, windows)
        extra = "" if scalars is None else " ".join(f"{float(scalars[k]):>{w}.{d}f}" for k, w, d in
                                                    (("commit", 9, 3), ("l1", 6, 3), ("mel", 6, 2)))
        print(f"{step:>5} {p['cos_to_mean']:>11.3f} {p['spread']:>6.3f} {p['latent_norm']:>8.3f} "
              f"{p['distinct_l0']:>8} {p['si_sdr_6kbps']:>7.2f} {extra}", flush=True)

    line(0, None)
    for step in range(steps):
        bandwidth = cfg.bandwidths[step % len(cfg.bandwidths)]
        scalars = train_step(parts, cfg, _train_batch(train, cfg, step, 0), bandwidth, step)
        if step + 1 in PROBE_STEPS or (step + 1) % every == 0:
            line(step + 1, {k: v.detach() for k, v in scalars.items()})


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", nargs="+", default=["dac", "unit_gain"], choices=("dac", "unit_gain"),
                   help="the DAC quantizer's init(s) to probe, one after the other")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=50, help="probe every N steps (and at steps 2, 5, 10, 20, 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig override")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    for init in args.init:
        run(init, args.steps, args.seed, args.set, args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
