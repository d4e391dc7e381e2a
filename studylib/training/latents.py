"""The quantizer-only fast path: encoder latents of the corpus, and RVQ variants trained alone on them.

    studylib latents CHECKPOINT [--manifest M] [--out FILE]

A codec step on 2 cores takes about 0.4 s; an RVQ step on the same 600 frames about 20 ms. Training
the quantizer alone on a trained encoder's real latent stream isolates the codebook dynamics the
study is about (usage, dead codes, replacements) for thousands of steps in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import soundfile as sf
import torch
from tqdm.auto import tqdm

from studylib.core import config as cfglib
from studylib.core import processes
from studylib.core.storage import DamagedFile, check_writable, read_parquet, read_torch, save_torch, warn, write_parquet
from studylib.model.metrics import utilization
from studylib.quantizers.ema import ResidualVectorQuantizer
from studylib.training.manifest import SPLITS, load_manifest
from studylib.training.run_config import QuantizerFields
from studylib.training.run_folder import RunFolder, load_checkpoint


@dataclass
class Latents:
    """Encoder outputs of every segment of a corpus, per split, as one frame stream each."""

    frames: dict[str, torch.Tensor]  # split -> [N, D] float32
    offsets: dict[str, torch.Tensor]  # split -> [S + 1] first frame of each segment, then N
    frame_rate: float
    source: str  # the checkpoint they came from

    def save(self, path: Path) -> None:
        save_torch(vars(self), path)

    @classmethod
    def load(cls, path: str | Path) -> Latents:
        """The latents in `path` (tensors and plain values only: DamagedFile or RefusedFile naming it otherwise)."""
        found = read_torch(path, what="latents file")
        if not isinstance(found, dict) or set(found) != {f.name for f in dataclasses.fields(cls)}:
            raise DamagedFile(f"{path}: not a latents file (expected the keys frames, offsets, frame_rate, source)")
        return cls(**found)


@torch.no_grad()
def dump_latents(checkpoint: str | Path, manifest: str | Path | None = None, out: str | Path | None = None,
                 splits: tuple[str, ...] = SPLITS, progress: bool = True) -> Path:
    """Encode every segment of `manifest` (default: the run's own) with the run's encoder; write `out`
    (default: latents.pt beside the checkpoint) and return its path."""
    codec, cfg, _ = load_checkpoint(checkpoint)
    manifest = Path(manifest or cfg.manifest)
    rows = load_manifest(manifest, check_files=True)
    ckpt_path = Path(checkpoint)
    out = Path(out) if out else (ckpt_path if ckpt_path.is_dir() else ckpt_path.parent) / RunFolder.LATENTS
    chosen = rows[rows.split.isin(splits)]  # float32 [N, D] frames: what the file will take, before minutes of encoding
    check_writable(out.parent, int(chosen.seconds.sum() * codec.config.frame_rate * codec.config.dimension * 4.4))
    frames, offsets = {}, {}
    for split in splits:
        paths = [manifest.parent / p for p in rows.loc[rows.split == split, "path"]]
        if not paths:
            raise ValueError(f"split {split!r} is empty in {manifest}")
        chunks = []
        for path in tqdm(paths, desc=f"latents {split}", disable=not progress):
            audio, _ = sf.read(str(path), dtype="float32", always_2d=True)
            wav = torch.from_numpy(audio.mean(axis=1))[None, None]  # [1, 1, T]
            chunks.append(codec.encoder(wav)[0].t())  # [F, D]
        frames[split] = torch.cat(chunks)
        offsets[split] = torch.tensor([0, *torch.tensor([len(c) for c in chunks]).cumsum(0).tolist()])
    Latents(frames, offsets, codec.config.frame_rate, str(checkpoint)).save(out)
    return out


def run_latents(run_folder: str | Path, manifest: str | Path | None = None, progress: bool = True) -> Latents:
    """The latents of a codec run's encoder: its `latents.pt` (cached beside the run), dumped from its checkpoint
    the first time. Checkpoints stay out of git, so a fresh checkout has neither: FileNotFoundError saying so and
    how to get one back (the run's files are otherwise whole, so the study runner does not train it again)."""
    folder = Path(run_folder)
    path = folder / RunFolder.LATENTS
    if not path.is_file():
        if not (folder / RunFolder.CHECKPOINT).is_file():
            raise FileNotFoundError(
                f"{folder}: neither latents.pt nor checkpoint.pt (checkpoints stay out of git); train the run again "
                f"with `studylib train --like {folder} --set run_dir=NEW_RUN` and dump its latents with "
                f"`studylib latents NEW_RUN --out {path}`")
        dump_latents(folder, manifest, path, progress=progress)
    return Latents.load(path)


# ------------------------------------------------------------------------------- RVQ on latents


@dataclass(frozen=True)
class LatentRunConfig(QuantizerFields):
    """One quantizer-only run. Each step sees `frames_per_step` frames as crops of `crop_frames`
    consecutive frames (8 x 75 = 600: EnCodec's per-GPU batch of 8 x 1 s)."""

    n_q: int = 8
    frames_per_step: int = 600
    crop_frames: int = 75
    steps: int = 2000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    eval_frames: int = 20_000

    def __post_init__(self) -> None:
        self.expiry()
        for name in ("n_q", "frames_per_step", "crop_frames", "steps", "log_every", "eval_every", "eval_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, allowed an integer >= 1")
        if self.frames_per_step % self.crop_frames:
            raise ValueError(f"frames_per_step: got {self.frames_per_step}, allowed a multiple of crop_frames "
                             f"({self.crop_frames})")


def latent_eval(rvq: ResidualVectorQuantizer, latents: torch.Tensor, frame_rate: float) -> dict[str, float]:
    """On held-out frames `latents` [N, D], per level l: quantization SNR after levels 0..l in dB against
    the latents' variance, 10 log10(|x - mean|^2 / |x - x_hat_l|^2) (0 dB: no better than the mean frame;
    an encoder's latents can carry a large constant offset, which plain |x|^2 would count as signal),
    usage (fraction of codes used at least once) and perplexity."""
    x = latents.t()[None]  # [1, D, N]
    codes = rvq.encode(x, frame_rate)  # [n_q, 1, N]
    residual, energy, out = x, (x - x.mean(-1, keepdim=True)).square().sum(), {}
    for level, (layer, level_codes) in enumerate(zip(rvq.vq.layers, codes)):
        residual = residual - layer.decode(level_codes)
        out[f"snr_l{level}"] = float(10 * torch.log10(energy / residual.square().sum().clamp_min(1e-20)))
    use = utilization(codes, rvq.bins)
    for row in use.itertuples():
        out[f"usage_l{row.level}"], out[f"perplexity_l{row.level}"] = float(row.usage), float(row.perplexity)
    return out


def train_on_latents(cfg: LatentRunConfig, train: torch.Tensor, evaluate: torch.Tensor | None = None,
                     frame_rate: float = 75.0, progress: bool = True, state: str | Path | None = None,
                     save_every: int = 1000) -> tuple[pd.DataFrame, ResidualVectorQuantizer]:
    """Train an RVQ alone on the frame stream `train` [N, D]; returns tidy metrics (one row per logged
    step; `split` = "train" rows carry the quantizer's per-level metrics of the step's batch and every
    level's replaced_total so far, "eval" rows `latent_eval` on the first `eval_frames` frames of
    `evaluate`) and the trained quantizer.
    `state`: a file the run saves itself to every `save_every` steps and resumes from (bit-exactly: the
    quantizer's buffers, counters and generators, the batch draws, the rows so far) when it exists and was
    written by the same config; a large cell (K = 16384 at 4,800 frames: ~1 h on one core) then survives an
    interruption. The caller removes it once the results are written."""
    if train.shape[0] < cfg.crop_frames:
        raise ValueError(f"train: {train.shape[0]} frames, fewer than one crop of {cfg.crop_frames}")
    rvq = ResidualVectorQuantizer(dimension=train.shape[1], n_q=cfg.n_q, bins=cfg.bins, decay=cfg.decay,
                                  kmeans_iters=cfg.kmeans_iters, expiry=cfg.expiry(), init_fix=cfg.init_fix,
                                  generator=torch.Generator().manual_seed(cfg.seed))
    draws = torch.Generator().manual_seed(cfg.seed + 1)
    crops = cfg.frames_per_step // cfg.crop_frames
    window = torch.arange(cfg.crop_frames)
    held_out = evaluate[: cfg.eval_frames] if evaluate is not None else None
    rows, done = [], 0
    saved = _saved_state(Path(state)) if state is not None else None
    if saved is not None:
        if saved.get("config") == dataclasses.asdict(cfg):
            rvq.load_state_dict(saved["rvq"])
            rvq.load_resume_state(saved["resume"])
            draws.set_state(saved["draws"])
            rows, done = saved["rows"], saved["step"]
        else:
            warn(f"{state}: written by another config; this run starts again")
    for step in tqdm(range(done + 1, cfg.steps + 1), desc="rvq", disable=not progress, initial=done,
                     total=cfg.steps):
        starts = torch.randint(0, train.shape[0] - cfg.crop_frames + 1, (crops, 1), generator=draws)
        x = train[starts + window].transpose(1, 2)  # [crops, D, crop_frames]
        out = rvq.train()(x, frame_rate)
        if step % cfg.log_every == 0 or step == cfg.steps:
            totals = {f"replaced_total_l{level}": float(cb.replaced_total) for level, cb in enumerate(rvq.codebooks)}
            rows.append({"step": step, "split": "train", **{k: float(v) for k, v in out.metrics.items()}, **totals})
        if held_out is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            rows.append({"step": step, "split": "eval", **latent_eval(rvq.eval(), held_out, frame_rate)})
        if state is not None and step % save_every == 0 and step < cfg.steps:
            save_torch({"config": dataclasses.asdict(cfg), "step": step, "rows": rows, "rvq": rvq.state_dict(),
                        "resume": rvq.resume_state(), "draws": draws.get_state()}, state)
    return pd.DataFrame(rows), rvq


# ------------------------------------------------------------------------------ the quantizer grid


STATE_KEYS = ("config", "step", "rows", "rvq", "resume", "draws")


def _saved_state(path: Path) -> dict | None:
    """A quantizer run's saved state, or None if there is none; a damaged one, or one that is not such a state
    (a list, keys missing), is moved aside with one warning naming it, and the run starts again."""
    if not path.is_file():
        return None
    try:
        saved = read_torch(path, what="quantizer run state")
        if not isinstance(saved, dict) or not set(STATE_KEYS) <= set(saved):
            raise DamagedFile(f"{path}: not a quantizer run state (expected a mapping of {', '.join(STATE_KEYS)})")
    except DamagedFile as e:
        os.replace(path, path.with_name(path.name + ".damaged"))
        warn(f"{e}; moved aside to {path.name}.damaged, this cell starts again")
        return None
    return saved


@dataclass(frozen=True)
class GridCell:
    """One quantizer-only run of a study grid: an arm (params/arms/<arm>.yaml) with overrides."""

    arm: str
    config: LatentRunConfig

    @property
    def name(self) -> str:
        return f"{self.arm}-{cfglib.config_hash(self.config, exclude=('seed',))}-s{self.config.seed}"

    @property
    def variant(self) -> str:
        """The settings that tell this cell from its arm's others: a label for plots and tables."""
        c = self.config
        if c.expiry_mode != "fixed":
            return f"{self.arm}"
        unit = "" if c.expiry_threshold_kind == "relative" else " abs"
        return f"{self.arm} th={c.expiry_threshold:g}{unit} every={c.expiry_every}"

    def describe(self) -> dict:
        c = self.config
        return {"cell": self.name, "arm": self.arm, "variant": self.variant, "seed": c.seed,
                "expiry_mode": c.expiry_mode, "expiry_threshold": c.expiry_threshold,
                "expiry_threshold_kind": c.expiry_threshold_kind, "expiry_every": c.expiry_every,
                "frames_per_step": c.frames_per_step, "n_q": c.n_q, "bins": c.bins, "steps": c.steps}


def expand_grid(grid: list[dict], arms_dir: str | Path, base: dict | None = None) -> list[GridCell]:
    """The cells of a quantizer grid. Each block of `grid` names `arm` (one or a list) and any
    LatentRunConfig keys; list values are crossed (a cartesian product), scalars apply to all. `base`
    (steps, n_q, seeds, ...) applies under every block; `seeds` (a list, in `base` or a block) is crossed
    too. Every cell is validated here, so a bad key fails before anything runs."""
    base = dict(base or {})
    seeds = base.pop("seeds", [base.pop("seed", 0)])
    cells, seen = [], set()
    for number, block in enumerate(grid):
        if not isinstance(block, dict) or "arm" not in block:
            raise cfglib.ConfigError(f"quantizer grid block {number}: expected a mapping with an 'arm' key, "
                                     f"got {block!r}")
        block = dict(block)
        block_seeds = block.pop("seeds", seeds)  # a block may run its own seeds
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in block.items()}
        axes["seed"] = list(block_seeds if isinstance(block_seeds, list) else [block_seeds])
        keys = list(axes)
        for values in itertools.product(*axes.values()):
            chosen = dict(zip(keys, values))
            arm = chosen.pop("arm")
            arm_file = Path(arms_dir) / f"{arm}.yaml"
            if not arm_file.is_file():
                known = sorted(p.stem for p in Path(arms_dir).glob("*.yaml"))
                raise cfglib.ConfigError(f"quantizer grid block {number}: arm {arm!r} unknown; allowed {known}")
            overlay = cfglib.read_overlay(arm_file)
            if overlay.get("quantizer", "ours") != "ours":
                raise cfglib.ConfigError(f"quantizer grid block {number}: arm {arm!r} is not our RVQ "
                                         "(the quantizer-only study trains studylib's RVQ)")
            cell = GridCell(arm, cfglib.build(LatentRunConfig, [base, overlay, chosen]))
            if cell.name not in seen:
                seen.add(cell.name)
                cells.append(cell)
    return cells


def cell_cost(cell: GridCell) -> int:
    """A cell's work in multiply-adds of its nearest-code searches (K x frames x levels x steps): the order
    `run_grid` trains cells in, cheapest first, so an interrupted grid has finished as many as it could."""
    c = cell.config
    return c.bins * c.frames_per_step * c.n_q * c.steps


def training_order(cells: list[GridCell]) -> list[GridCell]:
    """The order `run_grid` trains cells in: cheapest first, and among cells of one cost one seed's arms
    together, so that a grid stopped early holds whole paired comparisons (none vs fixed_rel of a seed)."""
    return sorted(cells, key=lambda cell: (cell_cost(cell), cell.config.seed))


def _train_cell(cell: GridCell, latents: Latents, path: Path) -> Path:
    """Train one cell on one thread and write its parquet: cells run side by side in workers, and one thread
    everywhere gives the same numbers whatever `jobs` (a cell trained in this process restores its thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = path.with_suffix(".state.pt")  # the cell part-way, should it be interrupted
        metrics, _ = train_on_latents(cell.config, latents.frames["train"], latents.frames.get("valid"),
                                      latents.frame_rate, progress=False, state=state)
        write_parquet(metrics.assign(**cell.describe()), path)
        state.unlink(missing_ok=True)
    finally:
        torch.set_num_threads(before)
    return path


def unfinished(cells: list[GridCell], out_dir: str | Path) -> list[GridCell]:
    """The cells of `cells` without a readable `out_dir/runs/<cell>.parquet` (a damaged one is named in a warning):
    what `run_grid` would train. None left: a report needs neither the latents nor the checkpoint they come from."""
    todo = []
    for cell in cells:
        path = Path(out_dir) / "runs" / f"{cell.name}.parquet"
        if path.is_file():
            try:
                read_parquet(path)
                continue
            except DamagedFile as e:
                warn(f"{e}; training that cell again")
        todo.append(cell)
    return todo


def run_grid(cells: list[GridCell], latents: Latents, out_dir: str | Path, progress: bool = True,
             jobs: int = 1) -> pd.DataFrame:
    """Train every cell on `latents` (train split; eval on valid), one parquet per cell in
    `out_dir/runs/` written when the cell finishes, so an interrupted grid resumes where it stopped.
    Returns all cells' rows, each tagged with `GridCell.describe()`. A cell whose file does not read (cut
    short by a full disk...) is trained again, with a warning naming it. `jobs` > 1: that many cells at a
    time in worker processes (processes.worker_pool), one thread each, cheapest cells first (one seed's arms
    together)."""
    runs = Path(out_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo = training_order(unfinished(cells, out_dir))
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="quantizer grid", disable=not progress)
    if jobs == 1 or len(todo) < 2:
        for cell in todo:
            _train_cell(cell, latents, runs / f"{cell.name}.parquet")
            bar.update()
    else:
        with processes.worker_pool(jobs) as pool:
            try:
                with processes.signals_held():  # the workers are forked here
                    pending = [pool.submit(_train_cell, cell, latents, runs / f"{cell.name}.parquet")
                               for cell in todo]
                for future in as_completed(pending):
                    future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                processes.stop_workers()
                raise
    bar.close()
    return pd.concat([read_parquet(runs / f"{cell.name}.parquet") for cell in cells], ignore_index=True)


# ---------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib latents", description="Dump a run's encoder latents.")
    parser.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    parser.add_argument("--manifest", help="corpus manifest (default: the run's own)")
    parser.add_argument("--out", help="output file (default: latents.pt beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        out = dump_latents(args.checkpoint, args.manifest, args.out)
    except (FileNotFoundError, ValueError, cfglib.ConfigError) as e:
        print(f"studylib latents: {e}", file=sys.stderr)
        return 2
    latents = Latents.load(out)
    sizes = ", ".join(f"{k} {len(v)} frames ({len(v) / latents.frame_rate / 60:.1f} min)"
                      for k, v in latents.frames.items())
    print(f"wrote {out}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

