"""Evaluation of a trained codec (and of Opus) on fixed test windows, through one scoring function.

    studylib evaluate RUN_DIR [--split test] [--bandwidths 1.5 6 24] [--visqol-items 16]
    studylib evaluate RUN_DIR --add-bands [--manifest PATH]  # only the sub-band tables of every checkpoint
    studylib opus MANIFEST [--split test] [--out results/baselines/opus_test.parquet]

Writes beside the run: `eval_<split>.parquet` (one row per item x bandwidth, every metric),
`eval_<split>_levels.parquet` (per bandwidth and level: usage, perplexity, entropy, dead codes, plus
the entropy bitrate), `eval_<split>_frequency.parquet` (codes-by-frequency at the highest bandwidth),
`eval_<split>_bands.parquet` (with `bands`: SI-SDR and energy ratio per window in three sub-bands),
`eval_<split>.json` (the settings they were made with, and the checkpoint's step) and
`examples/<kind>_<item>_{reference,<kbps>kbps}.flac` for the reports. It checks it can write there before
it computes; the CLI refuses to replace files made with other settings (a study's evaluation) without --force.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from tqdm.auto import tqdm

from studylib.core.config import UserError, check_option
from studylib.core.storage import (
    DamagedFile,
    atomic_write,
    check_writable,
    read_json,
    read_json_object,
    read_parquet,
    warn,
    write_json,
    write_parquet,
)
from studylib.model import metrics
from studylib.model.codec import SAMPLE_RATE, Codec
from studylib.training import baselines
from studylib.training.data import AudioDataset
from studylib.training.manifest import SPLITS, load_manifest
from studylib.training.run_folder import RunFolder, load_checkpoint

EXAMPLE_BANDWIDTHS = (1.5, 6.0, 24.0)
MAX_SECONDS = 60.0  # a test window: the corpus' segments are ~10 s; longer is a typo, not a setting
MILESTONE_BANDWIDTHS = (1.5, 6.0, 24.0)  # kbps at which milestone checkpoints are scored


@dataclass
class Evaluation:
    items: pd.DataFrame  # one row per item x bandwidth
    levels: pd.DataFrame  # one row per bandwidth x level
    frequency: pd.DataFrame  # level, rank, frequency at the highest bandwidth
    examples: list[Path]
    bands: pd.DataFrame | None = None  # with `bands`: one row per item x bandwidth x sub-band (`band_scores`)


def eval_windows(manifest: str | Path, split: str = "test", seconds: float = 5.0,
                 per_kind: int | None = None, sample_rate: int = SAMPLE_RATE) -> tuple[AudioDataset, pd.DataFrame]:
    """Fixed evaluation windows of a split and, per window, its manifest row (kind, group, source).

    `item` is the window's index in the dataset; `sample_rate` is the rate the codec needs (and the
    manifest's audio must have). `per_kind` keeps that many windows of each kind, spread
    evenly over the kind's windows (so over its sources), the same ones on every call."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, allowed {SPLITS}")
    if per_kind is not None and per_kind < 1:
        raise ValueError(f"per_kind: got {per_kind!r}, allowed None or an integer >= 1")
    dataset = AudioDataset(manifest, split, seconds, sample_rate, train=False)
    rows = load_manifest(manifest).query("split == @split").reset_index(drop=True)
    columns = ["path", "kind", "group", "source"]
    info = pd.DataFrame([{"item": i, "start_s": start / sample_rate, **rows.iloc[seg][columns]}
                         for i, (seg, start) in enumerate(dataset.windows)])
    if per_kind is not None:
        keep = [group.iloc[np.unique(np.linspace(0, len(group) - 1, min(per_kind, len(group))).round().astype(int))]
                for _, group in info.groupby("kind", sort=True)]
        info = pd.concat(keep).sort_values("item").reset_index(drop=True)
    return dataset, info


def score(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> list[dict]:
    """SI-SDR and mel distance per item of a batch [B, T]."""
    return [{"si_sdr": float(s), "mel_distance": float(m)} for s, m in
            zip(metrics.si_sdr(estimate, reference), metrics.mel_distance(estimate, reference, sample_rate))]


def visqol_scores(estimate: torch.Tensor, reference: torch.Tensor, kind: str, sample_rate: int = SAMPLE_RATE) -> dict:
    """ViSQOL of one item [T]: audio mode always, speech mode for speech items (modes are not comparable)."""
    speech = metrics.visqol(estimate, reference, sample_rate, "speech") if kind == "speech" else math.nan
    return {"visqol_audio": metrics.visqol(estimate, reference, sample_rate, "audio"), "visqol_speech": speech}


def _examples_to_save(info: pd.DataFrame, per_kind: int) -> set[int]:
    """The first `per_kind` windows of each kind, one per source where possible (fixed across runs)."""
    chosen = info.drop_duplicates("source").groupby("kind").head(per_kind)
    return set(chosen.item.tolist())


@torch.no_grad()
def evaluate(run: str | Path | Codec, split: str = "test", bandwidths: tuple[float, ...] | None = None,
             manifest: str | Path | None = None, seconds: float = 5.0, visqol_items: int = 16,
             examples_per_kind: int = 2, batch_size: int = 8, out_dir: str | Path | None = None,
             per_kind: int | None = None, progress: bool = True, suffix: str = "", force: bool = True,
             bands: bool = False) -> Evaluation:
    """Evaluate a run folder, a checkpoint file (e.g. a milestone's checkpoint_step500.pt) or a codec on the fixed
    windows of `split` (`per_kind` of each kind, or all); ViSQOL on the first `visqol_items` windows of each kind
    (it costs ~1 s per window); results written to `out_dir` (default: the run folder) when there is one, as
    eval_<split><suffix>.parquet, eval_<split><suffix>_levels.parquet and eval_<split><suffix>_frequency.parquet,
    with the settings beside them (eval_<split><suffix>.json); with `bands`, the sub-band scores too
    (eval_<split><suffix>_bands.parquet, `band_scores`). Before computing: WriteError if that folder cannot
    be written, and (force=False) UserError if it holds such an evaluation made with other settings."""
    step = None
    if isinstance(run, Codec):
        codec, run_dir = run.eval(), (Path(out_dir) if out_dir else None)
        if manifest is None:
            raise ValueError("manifest: required when evaluating a codec object rather than a run folder")
    else:
        codec, cfg, ckpt = load_checkpoint(run)
        run_dir = Path(out_dir) if out_dir else (Path(run) if Path(run).is_dir() else Path(run).parent)
        manifest, step = manifest or cfg.manifest, ckpt.get("step")
    bandwidths = tuple(sorted(bandwidths or codec.config.target_bandwidths))
    settings = {"split": split, "bandwidths": [float(b) for b in bandwidths], "manifest": str(Path(manifest).resolve()),
                "seconds": float(seconds), "per_kind": per_kind, "visqol_items": visqol_items,
                "examples_per_kind": examples_per_kind}
    if bands:  # only when asked: evaluations recorded before this setting existed keep matching their settings
        settings["bands"] = True
    if run_dir is not None:
        if not force:
            _refuse_other_settings(run_dir, settings, suffix)
        check_writable(run_dir, 8 << 20)  # tables and example FLACs: a few MB
    rate = codec.config.sample_rate
    dataset, info = eval_windows(manifest, split, seconds, per_kind, rate)
    kinds, sources = info.set_index("item").kind, info.set_index("item").source
    visqol_ids = set(info.groupby("kind").head(visqol_items).item) if visqol_items > 0 else set()
    example_ids = _examples_to_save(info, examples_per_kind)
    frame_rate, bins = codec.config.frame_rate, codec.config.bins
    levels = {bw: codec.quantizer.get_num_quantizers_for_bandwidth(frame_rate, bw) for bw in bandwidths}

    rows, level_rows, band_frames, codes_by_bw = [], [], [], {bw: [] for bw in bandwidths}
    ids_all = info.item.tolist()
    batches = [ids_all[i: i + batch_size] for i in range(0, len(ids_all), batch_size)]
    for ids in tqdm(batches, desc=f"evaluate {split}", disable=not progress):
        wav = torch.stack([dataset[i] for i in ids])  # [B, 1, T]
        # RVQ codes are sequential, so a lower bandwidth's codes are a prefix of the highest one's:
        # one encoder pass per batch, one decoder pass per bandwidth.
        all_codes = codec.encode(wav, bandwidths[-1])  # [n_q, B, F]
        for bw in bandwidths:
            codes = all_codes[: levels[bw]]
            audio = codec.decode(codes)[..., : wav.shape[-1]]
            codes_by_bw[bw].append(codes.flatten(1))
            if bands:  # on the audio just decoded: no second pass through the codec
                band_frames.append(_band_frame(audio, wav, ids, sources[ids].to_numpy(), bw, rate))
            for pos, (i, row) in enumerate(zip(ids, score(audio[:, 0], wav[:, 0], rate))):
                if i in visqol_ids:
                    row |= visqol_scores(audio[pos, 0], wav[pos, 0], kinds[i], rate)
                rows.append({"item": i, "system": "codec", "bandwidth": bw, "n_q": codes.shape[0],
                             "nominal_kbps": metrics.nominal_kbps(codes.shape[0], bins, frame_rate), **row})
    examples = _write_examples(codec, dataset, info, example_ids, bandwidths, run_dir) if run_dir and example_ids \
        else []
    for bw, chunks in codes_by_bw.items():
        codes = torch.cat(chunks, dim=1)  # [n_q, all frames]
        dead = torch.stack([cb.dead_mask() for cb in codec.quantizer.codebooks[: codes.shape[0]]])
        table = metrics.utilization(codes, bins, dead)
        table.insert(0, "bandwidth", bw)
        table["entropy_kbps"] = metrics.entropy_kbps(codes, bins, frame_rate)
        table["bitrate_efficiency"] = metrics.bitrate_efficiency(codes, bins)
        level_rows.append(table)
    top = torch.cat(codes_by_bw[bandwidths[-1]], dim=1)
    freq = metrics.sorted_frequency(top, bins)
    frequency = pd.DataFrame([{"level": lvl, "rank": r, "frequency": float(f)}
                              for lvl in range(freq.shape[0]) for r, f in enumerate(freq[lvl])])
    result = Evaluation(info.merge(pd.DataFrame(rows), on="item"), pd.concat(level_rows, ignore_index=True),
                        frequency, examples)
    if bands:
        result.bands = _band_table(band_frames)
    if run_dir is not None:
        write_parquet(result.items, run_dir / f"eval_{split}{suffix}.parquet")
        write_parquet(result.levels, run_dir / f"eval_{split}{suffix}_levels.parquet")
        write_parquet(result.frequency, run_dir / f"eval_{split}{suffix}_frequency.parquet")
        if bands:
            write_parquet(result.bands, run_dir / f"eval_{split}{suffix}_bands.parquet")
        write_json({**settings, "checkpoint_step": step}, run_dir / f"eval_{split}{suffix}.json")
    return result


def evaluation_files(run_dir: str | Path, split: str = "test", suffix: str = "",
                     bands: bool = False) -> tuple[Path, ...]:
    """The files one evaluation writes: items, levels, frequency tables and its settings (and, with `bands`, the
    sub-band table)."""
    stem = Path(run_dir) / f"eval_{split}{suffix}"
    return (stem.with_name(stem.name + ".parquet"), stem.with_name(stem.name + "_levels.parquet"),
            stem.with_name(stem.name + "_frequency.parquet"), stem.with_name(stem.name + ".json"),
            *([stem.with_name(stem.name + "_bands.parquet")] if bands else []))


def evaluation_current(run_dir: str | Path, checkpoint: Path, split: str = "test", suffix: str = "",
                       bands: bool = False) -> bool:
    """Whether the evaluation of `checkpoint` in `run_dir` is whole and newer than it: every file of it there and
    readable. A damaged one is moved aside (`<name>.damaged`, a warning naming it), so that it is made again."""
    current = True
    for path in evaluation_files(run_dir, split, suffix, bands):
        if not path.is_file():
            current = False
            continue
        try:
            read_json_object(path, "evaluation record") if path.suffix == ".json" else read_parquet(path)
            if checkpoint.is_file() and path.stat().st_mtime < checkpoint.stat().st_mtime:
                current = False
        except DamagedFile as e:
            os.replace(path, path.with_name(path.name + ".damaged"))
            warn(f"{e}; moved aside to {path.name}.damaged, evaluated again")
            current = False
    return current


def evaluate_once(run_dir: str | Path, split: str = "test", **kwargs) -> pd.DataFrame:
    """The items table of a run folder's final checkpoint on `split`: read back when its evaluation is whole and
    current (`evaluation_current`), computed (`evaluate`) otherwise."""
    run_dir = Path(run_dir)
    if evaluation_current(run_dir, run_dir / RunFolder.CHECKPOINT, split, bands=kwargs.get("bands", False)):
        return read_parquet(evaluation_files(run_dir, split)[0])
    return evaluate(run_dir, split, **kwargs).items


def evaluate_milestones(run_dir: str | Path, manifest: str | Path | None = None, per_kind: int | None = None,
                        seconds: float = 5.0, progress: bool = True, bands: bool = False) -> list[int]:
    """Evaluate each milestone checkpoint of a run (checkpoint_step<N>.pt, `TrainConfig.milestones`) that has no
    evaluation newer than itself, at MILESTONE_BANDWIDTHS (those the model has), without ViSQOL or examples, into
    eval_test_step<N>*.parquet (with `bands`, its sub-band scores too); returns the milestone steps on disk. The
    final checkpoint is the run's own evaluation (eval_test.parquet)."""
    run_dir = Path(run_dir)
    steps = []
    for step, path in sorted(milestone_checkpoints(run_dir).items()):
        steps.append(step)
        if evaluation_current(run_dir, path, "test", f"_step{step}", bands):
            continue
        codec, cfg, _ = load_checkpoint(path)
        bandwidths = tuple(b for b in MILESTONE_BANDWIDTHS if b in codec.config.target_bandwidths)
        evaluate(codec, "test", bandwidths or None, manifest or cfg.manifest, visqol_items=0, examples_per_kind=0,
                 seconds=seconds, out_dir=run_dir, per_kind=per_kind, progress=progress, suffix=f"_step{step}",
                 bands=bands)
    return steps


@torch.no_grad()
def band_scores(codec: Codec, manifest: str | Path, split: str = "test", seconds: float = 5.0,
                per_kind: int | None = None, bandwidths: tuple[float, ...] | None = None,
                sources: list[str] | None = None, batch_size: int = 8) -> pd.DataFrame:
    """`metrics.band_si_sdr` of `codec` on the fixed windows of `split` (those of `sources`, or all) at each of
    `bandwidths` it has (default: all of its own), the full-band SI-SDR beside it: one row per window x bandwidth x
    band. Says in which band a codec's waveform error lives, and whether a band is missing (energy ratio near 0) or
    present with the wrong waveform (ratio near 1, SI-SDR far below 0)."""
    codec.eval()
    rate = codec.config.sample_rate
    bandwidths = [b for b in (bandwidths or codec.config.target_bandwidths) if b in codec.config.target_bandwidths]
    dataset, info = eval_windows(manifest, split, seconds, per_kind, rate)
    if sources is not None:
        info = info[info.source.isin(list(sources))].reset_index(drop=True)
    frames = []
    for start in range(0, len(info), batch_size):
        chunk = info.iloc[start: start + batch_size]
        wav = torch.stack([dataset[int(i)] for i in chunk["item"]])  # [B, 1, T]
        for bw in bandwidths:
            audio = codec.decode(codec.encode(wav, bw))[..., : wav.shape[-1]]
            frames.append(_band_frame(audio, wav, chunk["item"].tolist(), chunk["source"].to_numpy(), bw, rate))
    return _band_table(frames)


def _band_frame(audio: torch.Tensor, wav: torch.Tensor, items: list[int], sources: np.ndarray, bw: float,
                rate: int) -> pd.DataFrame:
    """`metrics.band_si_sdr` of one batch (audio, wav [B, 1, T]) at one bandwidth, the full-band SI-SDR beside it,
    tagged with the windows' items and sources."""
    table = metrics.band_si_sdr(audio[:, 0], wav[:, 0], rate)
    full = metrics.si_sdr(audio[:, 0].double(), wav[:, 0].double()).numpy()
    table["full_band_si_sdr"] = full[table.item_pos]
    table["item"] = np.asarray(items)[table.item_pos]
    table["source"] = sources[table.item_pos]
    return table.assign(bandwidth=bw).drop(columns="item_pos")


def _band_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The batches' `_band_frame`s as one table, per bandwidth, per band, per window (the order of the tables 07
    keeps, computed in one batch before)."""
    columns = ["band", "si_sdr", "energy_share", "energy_ratio", "full_band_si_sdr", "item", "source", "bandwidth"]
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)
    order = {f"{low / 1000:g}-{high / 1000:g} kHz": i for i, (low, high) in enumerate(metrics.BANDS)}
    table = table.sort_values(["bandwidth", "band", "item"], key=lambda c: c.map(order) if c.name == "band" else c)
    return table[columns].reset_index(drop=True)


def add_band_scores(run_dir: str | Path, manifest: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Sub-band tables for a run evaluated without them (`studylib evaluate RUN --add-bands`): for its final and
    each milestone checkpoint on disk, eval_test[_step<N>]_bands.parquet on the windows and bandwidths of the
    evaluation already there (its eval_test[_step<N>].json; `manifest` where that record's is elsewhere), every other
    file left as it is. A table newer than its checkpoint is kept. Returns the tables written."""
    run_dir = Path(run_dir)
    checkpoints = [("", run_dir / RunFolder.CHECKPOINT)] + [(f"_step{step}", path) for step, path in
                                                           sorted(milestone_checkpoints(run_dir).items())]
    written = []
    for suffix, checkpoint in tqdm(checkpoints, desc="sub-band scores", disable=not progress):
        *_, record, table = evaluation_files(run_dir, "test", suffix, bands=True)
        if not checkpoint.is_file() or (table.is_file() and table.stat().st_mtime >= checkpoint.stat().st_mtime):
            continue
        settings = read_json_object(record, "evaluation record")
        if settings is None:
            raise UserError(f"{record}: no evaluation of {checkpoint.name} to take the windows from; evaluate it first")
        codec, _, _ = load_checkpoint(checkpoint)
        write_parquet(band_scores(codec, manifest or settings["manifest"], "test", settings["seconds"],
                                  settings["per_kind"], tuple(settings["bandwidths"])), table)
        written.append(table)
    return written


def milestone_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> checkpoint_step<step>.pt of a run folder."""
    found = {}
    for path in Path(run_dir).glob("checkpoint_step*.pt"):
        step = path.stem.removeprefix("checkpoint_step")
        if step.isdigit():
            found[int(step)] = path
    return found


def _refuse_other_settings(run_dir: Path, settings: dict, suffix: str = "") -> None:
    """UserError if `run_dir` holds an evaluation of the split made with other settings (or with settings it
    does not record): a study's evaluation is not replaced by accident."""
    items = run_dir / f"eval_{settings['split']}{suffix}.parquet"
    if not items.is_file():
        return
    try:
        recorded = read_json(items.with_suffix(".json"))
    except DamagedFile:
        recorded = None
    if recorded is None:
        raise UserError(f"{items}: an evaluation is there, made with settings it does not record (no "
                        f"{items.with_suffix('.json').name} beside it); pass --force to replace it")
    changed = [f"{key} {recorded.get(key)!r} there, {value!r} asked" for key, value in settings.items()
               if recorded.get(key) != value]
    if changed:
        raise UserError(f"{items}: an evaluation made with other settings is there ({'; '.join(changed)}); pass "
                        "--force to replace it, or ask for the same settings")


def _write_examples(codec: Codec, dataset: AudioDataset, info: pd.DataFrame, ids: set[int],
                    bandwidths: tuple[float, ...], run_dir: Path) -> list[Path]:
    """FLAC of the reference and of the reconstructions at EXAMPLE_BANDWIDTHS, for the reports."""
    folder = run_dir / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    kinds = info.set_index("item").kind
    written = []
    for i in sorted(ids):
        wav = dataset[i][None]  # [1, 1, T]
        versions = {"reference": wav} | {f"{bw:g}kbps": codec.decode(codec.encode(wav, bw))[..., : wav.shape[-1]]
                                         for bw in bandwidths if bw in EXAMPLE_BANDWIDTHS}
        for label, audio in versions.items():
            path = folder / f"{kinds[i]}_{i:04d}_{label}.flac"
            flac = functools.partial(sf.write, data=audio[0, 0].clamp(-1, 1).numpy(),
                                     samplerate=codec.config.sample_rate, format="FLAC")
            written.append(atomic_write(path, flac))
    return written


def evaluate_opus(manifest: str | Path, split: str = "test", bitrates: tuple[float, ...] = baselines.OPUS_BITRATES,
                  seconds: float = 5.0, visqol_items: int = 16, out: str | Path | None = None,
                  per_kind: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Opus on the same windows, scored by the same code; `bandwidth` is the requested kbps and
    `payload_kbps` what Opus actually spent."""
    baselines.require_opus()
    if out is not None:
        check_writable(Path(out).parent)  # before the minutes of encoding
    dataset, info = eval_windows(manifest, split, seconds, per_kind)
    kinds = info.set_index("item").kind
    visqol_ids = set(info.groupby("kind").head(visqol_items).item) if visqol_items > 0 else set()
    rows = []
    for i in tqdm(info.item.tolist(), desc=f"opus {split}", disable=not progress):
        ref = dataset[i][0]
        for kbps in bitrates:
            result = baselines.opus_encode_decode(ref.numpy(), kbps)
            est = torch.from_numpy(np.ascontiguousarray(result.audio))
            row = score(est[None], ref[None])[0]
            if i in visqol_ids:
                row |= visqol_scores(est, ref, kinds[i])
            rows.append({"item": i, "system": "opus", "bandwidth": kbps, "nominal_kbps": kbps,
                         "payload_kbps": result.payload_kbps, **row})
    table = info.merge(pd.DataFrame(rows), on="item")
    if out is not None:
        write_parquet(table, out)
    return table


def opus_cached(path: str | Path, manifest: str | Path, bitrates: tuple[float, ...], split: str = "test",
                seconds: float = 5.0, visqol_items: int = 16, per_kind: int | None = None,
                progress: bool = True) -> pd.DataFrame | None:
    """`evaluate_opus` computed once and kept at `path` with its settings beside it (`path`.json): a later
    call with the same settings reads the file, other settings recompute it. None when opus-tools is missing."""
    path = Path(path)
    settings = {"manifest": str(Path(manifest).resolve()), "bitrates": [float(b) for b in bitrates], "split": split,
                "seconds": seconds, "visqol_items": visqol_items, "per_kind": per_kind}
    sidecar = path.with_suffix(".json")
    try:
        if path.is_file() and read_json(sidecar) == settings:
            return read_parquet(path)
    except DamagedFile as e:  # computed again below
        warn(f"{e}; computing it again")
    if not baselines.opus_available():
        return None
    table = evaluate_opus(manifest, split, tuple(bitrates), seconds, visqol_items, path, per_kind, progress)
    write_json(settings, sidecar)
    return table


# ---------------------------------------------------------------------------------------------- CLI


def _summary(items: pd.DataFrame) -> str:
    cols = [c for c in ("si_sdr", "mel_distance", "visqol_audio", "visqol_speech") if c in items]
    return items.groupby(["system", "bandwidth", "kind"])[cols].mean().round(3).to_string()


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib evaluate", description="Evaluate a run on fixed test windows.")
    parser.add_argument("run", help="a run folder or its checkpoint.pt")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--bandwidths", type=float, nargs="+", help="kbps (default: the model's)")
    parser.add_argument("--visqol-items", type=int, default=16, help="ViSQOL on this many windows per kind")
    parser.add_argument("--per-kind", type=int, help="this many windows of each kind (default: all)")
    parser.add_argument("--seconds", type=float, default=5.0, help="window length (default 5)")
    parser.add_argument("--force", action="store_true",
                        help="replace an evaluation made with other settings (e.g. the study's)")
    parser.add_argument("--add-bands", action="store_true",
                        help="only add the sub-band tables (eval_test[_step<N>]_bands.parquet) of the final and "
                             "milestone checkpoints, on the windows of the evaluations already there")
    parser.add_argument("--manifest", help="with --add-bands: the corpus manifest, where the evaluations' is elsewhere")
    args = parser.parse_args(argv)
    try:
        if args.add_bands:
            written = add_band_scores(args.run, args.manifest)
            print("\n".join(str(p) for p in written) if written else "every checkpoint has its sub-band table")
            return 0
        check_option("--seconds", args.seconds, 0, MAX_SECONDS, low_open=True)
        check_option("--visqol-items", args.visqol_items, 0, integer=True)
        check_option("--per-kind", args.per_kind, 1, integer=True)
        for kbps in args.bandwidths or ():
            check_option("--bandwidths", kbps, 0, low_open=True)
        result = evaluate(args.run, args.split, tuple(args.bandwidths) if args.bandwidths else None,
                          seconds=args.seconds, visqol_items=args.visqol_items, per_kind=args.per_kind,
                          force=args.force)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"studylib evaluate: {e}", file=sys.stderr)
        return 2
    print(_summary(result.items))
    return 0


def opus_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib opus", description="Opus baseline on fixed test windows.")
    parser.add_argument("manifest")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--visqol-items", type=int, default=16)
    parser.add_argument("--out", default=None, help="parquet (default: results/baselines/opus_<split>.parquet)")
    args = parser.parse_args(argv)
    out = args.out or f"results/baselines/opus_{args.split}.parquet"
    try:
        check_option("--visqol-items", args.visqol_items, 0, integer=True)
        table = evaluate_opus(args.manifest, args.split, visqol_items=args.visqol_items, out=out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"studylib opus: {e}", file=sys.stderr)
        return 2
    print(_summary(table))
    print(f"wrote {out}")
    return 0
