"""Codec training: one config, one loop, tidy metrics, checkpoints that resume bit-exactly.

    studylib train PARAMS.yaml [MORE.yaml ...] [--set key=value ...]
    torchrun --nproc_per_node 2 -m studylib.training.train PARAMS.yaml ...      # DDP (gloo on CPU, nccl on GPU)

A run folder holds `manifest.json` (resolved config, hash, seed, git commit, versions, device, status,
times), `metrics.parquet` (one row per logged step, same column names everywhere) and
`checkpoint.pt`. Every random draw is keyed by (seed, step, rank) or lives in a generator saved in the
checkpoint, so a killed run resumed from its last checkpoint ends identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from studylib.core import config as cfglib
from studylib.core import distributed, locks, processes
from studylib.core.config import UserError
from studylib.core.storage import WriteError, read_parquet, save_torch, write_json, write_parquet
from studylib.model import metrics
from studylib.model.codec import EMA_QUANTIZERS, Codec
from studylib.model.discriminator import MultiScaleSTFTDiscriminator, discriminator_step_loss, generator_losses
from studylib.model.losses import Balancer, MultiScaleMelLoss, neg_si_sdr
from studylib.quantizers.ema import NonFiniteError
from studylib.training import bounds
from studylib.training.data import AudioDataset, BadAudio, NonFiniteAudio
from studylib.training.run_config import NOT_HASHED, TrainConfig
from studylib.training.run_folder import (
    RunFolder,
    load_checkpoint,
    read_checkpoint,
    read_manifest,
    stored_config,
    weights_mismatch,
)


class TrainingDiverged(RuntimeError):
    """NaN or Inf in a loss or a codebook after clean data; the message says at which step."""


# ----------------------------------------------------------------------------------------- helpers


def _step_generator(*key: int) -> torch.Generator:
    """A generator that depends on (seed, step, rank, ...) only, so resumed runs draw the same."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    found = {}
    for pkg in ("studylib", "torch", "torchaudio", "numpy", "pandas", "encodec"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


def _scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in metrics.items()}


def missing_cpu_bf16() -> str | None:
    """None if this CPU computes bfloat16 natively, else what it lacks. Without it, oneDNN emulates bf16 and a
    bf16 step is slower than float32, so `bf16: true` on such a CPU is refused rather than run."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return None
    return "no avx512_bf16 or amx_bf16 in /proc/cpuinfo" if flags else "cannot read the CPU's flags from /proc/cpuinfo"


# ------------------------------------------------------------------------------------------ the run


@dataclass
class TrainOutcome:
    """What `train` returns: where the run lives and how it ended."""

    run_dir: Path
    status: str
    steps: int
    metrics: pd.DataFrame


@dataclass
class Parts:
    """What a training step works on: the codec, its losses and optimisers (discriminator: optional)."""

    model: Codec
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mel_loss: MultiScaleMelLoss
    balancer: Balancer | None = None
    disc: MultiScaleSTFTDiscriminator | None = None
    disc_opt: torch.optim.Optimizer | None = None

    def state(self) -> dict:
        extra = {"disc": self.disc.state_dict(), "disc_optimizer": self.disc_opt.state_dict()} if self.disc else {}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rvq": self.model.quantizer.resume_state(),
                "balancer": self.balancer.state_dict() if self.balancer else None, **extra}

    def load(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.model.quantizer.load_resume_state(ckpt["rvq"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.balancer is not None:
            self.balancer.load_state_dict(ckpt["balancer"])
        if self.disc is not None:
            self.disc.load_state_dict(ckpt["disc"])
            self.disc_opt.load_state_dict(ckpt["disc_optimizer"])


def loss_weights(cfg: TrainConfig) -> dict[str, float]:
    """Weights of the terms that act on the codec's output (balanced or summed); commitment aside."""
    weights = {"l1": cfg.weight_l1, "mel": cfg.weight_mel, "sisdr": cfg.weight_sisdr}
    if cfg.adversarial:
        weights |= {"g_adv": cfg.weight_adv, "feat": cfg.weight_feat}
    return weights


def build_parts(cfg: TrainConfig, device: torch.device) -> Parts:
    """A fresh codec (weights from cfg.seed, identical on every rank) with its optimiser and losses."""
    torch.manual_seed(cfg.seed)
    codec_cfg = cfg.codec_config()
    model = Codec(codec_cfg, generator=torch.Generator().manual_seed(cfg.seed)).to(device).train()
    if cfg.compile:
        model.compile_networks()
    if cfg.freeze_encoder:  # its weights come from cfg.init_from (warm_start) and stay as they are
        model.encoder.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    # linear warm-up: step s (0-based) runs at lr x (s + 1) / warmup_steps until warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    disc = MultiScaleSTFTDiscriminator().to(device) if cfg.adversarial else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)) if disc else None
    balancer = Balancer(loss_weights(cfg)) if cfg.balancer else None
    return Parts(model, optimizer, scheduler, MultiScaleMelLoss(codec_cfg.sample_rate).to(device), balancer,
                 disc, disc_opt)


def train_step(parts: Parts, cfg: TrainConfig, wav: torch.Tensor, bandwidth: float, step: int,
               world: int = 1) -> dict[str, torch.Tensor]:
    """One update of the codec (and of the discriminator first, when on); returns the step's scalars."""
    model, weights = parts.model, loss_weights(cfg)
    # The quantizer inside runs in float32 (codec.full_precision) and the audio comes out as float32.
    with torch.autocast(wav.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        out = model(wav, bandwidth, quantize=step >= cfg.quantizer_warmup)
        terms = {"l1": (out.audio - wav).abs().mean(), "mel": parts.mel_loss(out.audio, wav)}
        if cfg.weight_sisdr > 0:
            terms["sisdr"] = neg_si_sdr(out.audio, wav)
    logged: dict[str, torch.Tensor] = {}
    if parts.disc is not None and step >= cfg.adversarial_from:
        logged["disc"] = _discriminator_step(parts, wav, out.audio, world)
        adv = generator_losses(parts.disc, wav, out.audio)
        terms |= {"g_adv": adv.g_adv, "feat": adv.feat}
    commit = cfg.weight_commit * out.penalty
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.balancer is not None:
        loss = parts.balancer.backward(terms, out.audio, extra=commit)
        logged |= {f"norm_share_{k}": torch.tensor(v) for k, v in parts.balancer.metrics.items()}
    else:
        loss = sum(weights[name] * term for name, term in terms.items()) + commit
        loss.backward()  # also leaves gradients on the discriminator: cleared before its next step
    _sync_gradients(model, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    lr = parts.optimizer.param_groups[0]["lr"]
    parts.optimizer.step()
    parts.scheduler.step()
    if world > 1 and cfg.ddp_buffers == "average":
        _average_codebooks(model, world)
    return {"loss": loss, **terms, "commit": out.penalty, "bandwidth": out.bandwidth, "grad_norm": grad_norm,
            "lr": torch.tensor(lr), **logged, **out.metrics}


def _discriminator_step(parts: Parts, wav: torch.Tensor, audio: torch.Tensor, world: int) -> torch.Tensor:
    """One update of the discriminator on the codec's detached output; returns its loss."""
    disc_loss = discriminator_step_loss(parts.disc, wav, audio)
    parts.disc_opt.zero_grad(set_to_none=True)
    disc_loss.backward()
    _sync_gradients(parts.disc, world)
    parts.disc_opt.step()
    return disc_loss


def train(cfg: TrainConfig) -> TrainOutcome:
    """Train (or resume) the run in `cfg.run_dir`; returns when it is complete (or failed: diverged, or NaN
    in the data).

    Bad input raises UserError (one line naming the file or folder) before anything is written: the manifest
    (checked whole by AudioDataset, every audio file decoded at its header and its end), a run folder in use by
    another process (`.lock`, held by rank 0), one that cannot be written, a checkpoint that is unreadable, of
    another config or that would run code, and device cuda without a CUDA device. A full disk mid-run is a
    WriteError (status failed); Ctrl-C or SIGTERM leaves the run `interrupted`, resumable from its checkpoint."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    bounds.check_inputs(cfg)  # before any folder, lock or memory: one line naming the key
    bounds.check_fits(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: got 'cuda', but torch sees no CUDA device on this machine; use auto or cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = distributed.rank(), distributed.world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals made a CPU codec step vary 0.6-14 s here
        missing = missing_cpu_bf16() if cfg.bf16 else None
        if missing:
            raise UserError(f"bf16: this CPU has no native bfloat16 ({missing}); set bf16: false")
    else:
        torch.cuda.set_device(device)

    sample_rate = cfg.codec_config().sample_rate
    data = Data(AudioDataset(cfg.manifest, "train", cfg.segment_seconds, sample_rate, seed=cfg.seed),
                AudioDataset(cfg.manifest, "valid", cfg.segment_seconds, sample_rate), device, rank, world)
    run_dir = Path(cfg.run_dir)
    with locks.hold_lock(run_dir, "studylib train") if rank == 0 else contextlib.nullcontext():
        return _train(_setup(cfg, run_dir, data))


# ------------------------------------------------------------------------------ setup and resume


@dataclass(frozen=True)
class Data:
    """Where a run's batches come from and go: its datasets, device and place among the ranks."""

    train_set: AudioDataset
    valid_set: AudioDataset
    device: torch.device
    rank: int
    world: int


@dataclass
class Session:
    """A run set up to train: its parts and data, the step it starts at, and what it has logged so far."""

    cfg: TrainConfig
    run_dir: Path
    data: Data
    parts: Parts
    start: int  # 0, or the step of the checkpoint it resumed from
    rows: list[dict]  # the metrics so far: one flat dict per logged step (from the checkpoint on resume)
    manifest: dict = dataclasses.field(default_factory=dict)  # manifest.json as last written
    done: int = 0  # steps completed, which error messages name
    saved: int = 0  # the step of the checkpoint on disk (0: none yet), where an interrupted run resumes

    def write_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        if self.data.rank == 0:
            write_json(self.manifest, self.run_dir / RunFolder.MANIFEST)

    def record_end(self, **fields: Any) -> None:
        """The manifest's last word on a run that stops early, where it can still be written (a full disk
        may refuse even that: the error that stopped the run is what the caller reports)."""
        try:
            self.write_manifest(**fields, finished=_now())
        except WriteError:
            pass

    def write_metrics(self) -> None:
        if self.data.rank == 0:
            write_parquet(pd.DataFrame(self.rows), self.run_dir / RunFolder.METRICS)

    def checkpoint(self) -> None:
        """Metrics and checkpoint as of `done` steps: what a resumed run starts from (at a milestone, also kept
        as checkpoint_step<done>.pt)."""
        self.write_metrics()
        if self.data.rank == 0:
            state = {**self.parts.state(), "step": self.done, "rows": self.rows, "config": cfglib.to_dict(self.cfg)}
            save_torch(state, self.run_dir / RunFolder.CHECKPOINT)
            if self.done in self.cfg.milestones:
                save_torch(state, milestone_checkpoint(self.run_dir, self.done))
        self.saved = self.done


def _setup(cfg: TrainConfig, run_dir: Path, data: Data) -> Session:
    """Fresh parts, resumed from the run folder's checkpoint when there is one (refused if it is unreadable
    or of another config); manifest.json written saying the run is running."""
    chash = cfglib.config_hash(cfg, exclude=NOT_HASHED)
    try:
        previous = read_manifest(run_dir) or {}
    except ValueError:  # not JSON (damaged, edited by hand?): it is rewritten below
        previous = {}
    ckpt_path = run_dir / RunFolder.CHECKPOINT
    ckpt = _resume_checkpoint(ckpt_path, chash, run_dir, data.device) if ckpt_path.exists() else None
    session = Session(cfg, run_dir, data, build_parts(cfg, data.device), start=0, rows=[])
    started = _now()
    if ckpt is None and cfg.init_from:
        warm_start(session.parts.model, cfg.init_from)
    if ckpt is not None:
        session.parts.load(ckpt)
        session.start, session.rows = ckpt["step"], ckpt["rows"]
        started = previous.get("started", started)
        del ckpt
    session.done = session.saved = session.start
    session.write_manifest(**_run_record(cfg, chash, data, started, session.start))
    if session.start:  # the metrics as of the checkpoint: a damaged or newer metrics.parquet is replaced
        session.write_metrics()
    return session


def warm_start(model: Codec, source: str | Path) -> None:
    """Copy the encoder and decoder weights of the run (folder or checkpoint) `source` into `model`; its quantizer
    is left fresh. UserError naming `source` if it does not read or its networks are shaped otherwise."""
    with _advice("init_from: give a finished run folder or checkpoint of the same model"):
        trained, _, _ = load_checkpoint(source)
        for part in ("encoder", "decoder"):
            theirs = getattr(trained, part).state_dict()
            if problem := weights_mismatch(theirs, getattr(model, part).state_dict()):
                raise UserError(f"{source}: its {part} does not fit this run's: {problem}")
            getattr(model, part).load_state_dict(theirs)


def _run_record(cfg: TrainConfig, chash: str, data: Data, started: str, start: int) -> dict:
    """What manifest.json says of a run as it starts: config, versions, machine and where it resumed."""
    device = data.device
    return {
        "status": "running", "config": cfglib.to_dict(cfg), "config_hash": chash, "seed": cfg.seed,
        "git_commit": _git_commit(), "versions": _versions(), "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or 'x86_64'})",
        "world_size": data.world, "threads": torch.get_num_threads(), "started": started, "resumed_at_step": start,
        "frame_rate": cfg.codec_config().frame_rate, "frames_per_step": cfg.frames_per_step * data.world,
    }


def _resume_checkpoint(path: Path, chash: str, run_dir: Path, device: torch.device) -> dict:
    """The checkpoint to resume from, accepted only if it is readable and its stored config hashes to the
    run's: weights of another config must not continue under this run's name."""
    with _advice("delete it to start the run over, or choose another run_dir"):
        ckpt = read_checkpoint(path, device)
        if not isinstance(ckpt, dict) or not {"model", "config", "step", "rows"} <= ckpt.keys():
            raise UserError(f"{path}: not a studylib run checkpoint (expected keys model, config, step, rows)")
    with _advice("choose another run_dir"):
        stored = cfglib.config_hash(stored_config(ckpt, path), exclude=NOT_HASHED)
    if stored != chash:
        raise UserError(f"run_dir: {run_dir} holds a run of another config (checkpoint.pt: {stored}, this run: "
                        f"{chash}); choose another run_dir")
    return ckpt


@contextlib.contextmanager
def _advice(what_to_do: str):
    """UserErrors raised inside end with `; what_to_do`."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{e}; {what_to_do}") from None


# ------------------------------------------------------------------------------------- the loop


def _train(session: Session) -> TrainOutcome:
    """Run the steps left; on divergence or bad data the run ends `failed` (manifest and metrics say why);
    Ctrl-C or SIGTERM leave it `interrupted` (the exception carries a note saying where it resumes); a full
    disk or anything else (a crash) leaves it `failed` with the error. The last checkpoint stays resumable."""
    # a resumed run's clock goes on from its last logged row: `seconds` and train_seconds count every session
    elapsed = float(session.rows[-1].get("seconds", 0.0)) if session.rows else 0.0
    cfg, started = session.cfg, time.perf_counter() - elapsed
    try:
        _loop(session, started)
    except (TrainingDiverged, BadAudio) as e:
        error = str(e) if isinstance(e, TrainingDiverged) else f"step {session.done}: {e}"
        session.write_manifest(status="failed", error=error, finished=_now())
        session.write_metrics()
        print(f"studylib train: {error}", file=sys.stderr)
        steps = session.rows[-1]["step"] if session.rows else session.start
        return TrainOutcome(session.run_dir, "failed", steps, pd.DataFrame(session.rows))
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or the study stopping the kernel this runs in
        signal, _ = processes.stop_signal(e)
        resume = (f"resumes it from its checkpoint at step {session.saved}" if session.saved else
                  "starts it over (no checkpoint yet)")
        note = f"interrupted by {signal} at step {session.done} of {cfg.steps}; the same command {resume}"
        session.record_end(status="interrupted", error=note)
        e.add_note(note)
        raise
    except WriteError as e:  # the disk is full or the folder became read-only
        session.record_end(status="failed", error=str(e))
        raise
    except BaseException as e:  # crashed: the last checkpoint stays resumable
        session.record_end(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=5))
        raise
    if session.data.world > 1:  # each rank's codebooks, to show whether ranks agree
        save_torch({k: v.cpu() for k, v in session.parts.model.quantizer.named_buffers()},
                   session.run_dir / f"rank{session.data.rank}_codebooks.pt")
    session.write_manifest(status="complete", finished=_now(), train_seconds=time.perf_counter() - started)
    return TrainOutcome(session.run_dir, "complete", cfg.steps, pd.DataFrame(session.rows))


def _loop(session: Session, started: float) -> None:
    """Steps `start` to `steps`: train; log, validate and checkpoint when due (and after the last step)."""
    cfg, model = session.cfg, session.parts.model
    bar = tqdm(range(session.start, cfg.steps), initial=session.start, total=cfg.steps, desc=session.run_dir.name,
               disable=not cfg.progress or session.data.rank != 0, dynamic_ncols=True)
    due = lambda every: session.done % every == 0 or session.done == cfg.steps
    for step in bar:
        session.done = step + 1
        scalars = _step(session, step)
        if due(cfg.log_every):
            row = {"step": session.done, "split": "train", "seconds": time.perf_counter() - started,
                   **_scalars(scalars), **_codebook_totals(model)}
            _check_finite(row, model, session.done)
            session.rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", used_l0=row.get("used_l0"))
        if due(cfg.valid_every):
            _validate(session, started)
        if due(cfg.checkpoint_every) or session.done in cfg.milestones:
            session.checkpoint()


def _step(session: Session, step: int) -> dict[str, torch.Tensor]:
    """Training step `step` (0-based) on its batch and bandwidth, both keyed by (seed, step, rank); the codebooks'
    k-means first if this step ends the quantizer's warm-up. TrainingDiverged if the model's numbers go bad."""
    cfg, data = session.cfg, session.data
    wav = _train_batch(data.train_set, cfg, step, data.rank).to(data.device)
    if not torch.isfinite(wav).all():
        raise NonFiniteAudio("the training batch holds NaN or Inf samples")
    bandwidth = cfg.bandwidths[int(torch.randint(len(cfg.bandwidths), (1,), generator=_step_generator(cfg.seed, step)))]
    try:
        if step == cfg.quantizer_warmup and cfg.kmeans_frames > 0:
            _init_codebooks(session.parts.model, data.train_set, cfg, data.rank, data.device)
        scalars = train_step(session.parts, cfg, wav, bandwidth, step, data.world)
    except NonFiniteError as e:  # the batch is finite: the model's own numbers went bad
        raise TrainingDiverged(f"diverged at step {step + 1}: {e}") from None
    # every step, not only logged ones, so the message names the step where it happened
    if not torch.isfinite(scalars["loss"]):
        raise TrainingDiverged(f"diverged at step {step + 1}: the training loss is {float(scalars['loss'])}")
    return scalars


def _validate(session: Session, started: float) -> None:
    """Scores on the validation windows as one row; TrainingDiverged if the loss is not finite."""
    cfg, parts, data = session.cfg, session.parts, session.data
    scores = validate(parts.model, parts.mel_loss, data.valid_set, cfg, data.device,
                      session.done > cfg.quantizer_warmup)
    session.rows.append({"step": session.done, "split": "valid", "seconds": time.perf_counter() - started, **scores})
    parts.model.train()
    if not math.isfinite(scores["loss"]):  # a model that is NaN on held-out audio has diverged too
        raise TrainingDiverged(f"diverged at step {session.done}: the validation loss is {scores['loss']}")


def milestone_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Where a run keeps its checkpoint of milestone `step`."""
    return Path(run_dir) / f"checkpoint_step{step}.pt"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _train_batch(dataset: AudioDataset, cfg: TrainConfig, step: int, rank: int) -> torch.Tensor:
    """[B, 1, T] crops; which items and where they are cropped depend only on (seed, step, rank)."""
    g = _step_generator(cfg.seed, step, rank)
    n = len(dataset)
    idx = torch.randperm(n, generator=g)[: cfg.batch_size] if n >= cfg.batch_size else \
        torch.randint(n, (cfg.batch_size,), generator=g)
    dataset.set_epoch(step * 1000 + rank)
    return torch.stack([dataset[int(i)] for i in idx])


@torch.no_grad()
def _init_codebooks(model: Codec, dataset: AudioDataset, cfg: TrainConfig, rank: int, device: torch.device) -> None:
    """k-means on at least cfg.kmeans_frames latent frames of the current encoder, from extra training
    batches keyed (seed, steps + i, rank), past the last training step, so a resumed run gathers the same
    ones and training never sees them twice in a row."""
    if all(bool(cb.inited) for cb in model.quantizer.codebooks):
        return
    latents, frames, i = [], 0, 0
    while frames < cfg.kmeans_frames:
        wav = _train_batch(dataset, cfg, cfg.steps + i, rank).to(device)
        latent = model.encoder(wav).float()  # [B, D, F]
        latents.append(latent.transpose(1, 2).reshape(-1, latent.shape[1]))
        frames, i = frames + latents[-1].shape[0], i + 1
    model.quantizer.init_codebooks(torch.cat(latents))


def _sync_gradients(model: torch.nn.Module, world: int) -> None:
    """Average gradients across ranks in one collective (what DDP does, spelled out)."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    distributed.all_reduce_sum_(flat).div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def _average_codebooks(model: Codec, world: int) -> None:
    """AudioCraft's buffer sync after every step. Where ranks already agree it leaves the buffers bit for
    bit as they were only if the all-reduce sums `world` equal values to exactly world * x, since x * n / n
    is exact only for n a power of two: so for 2 ranks (x + x) always, for 4 or 8 when the sum is taken
    pairwise; not for 3, 5 or 6 ranks (3x rounds), nor for 8 summed one rank at a time (float32 running
    sums of equal values: exact for 2 and 4 terms, last bit off for 3, 5, 6 and 8)."""
    ema = model.config.quantizer in EMA_QUANTIZERS  # dac, simvq: codebooks are parameters, averaged as gradients;
    for cb in model.quantizer.codebooks:  # their reporting EMA of code counts is averaged like cluster_size
        for buf in (cb.cluster_size, cb.embed, cb.embed_avg) if ema else (cb.usage.counts,):
            distributed.all_reduce_sum_(buf).div_(world)


def _codebook_totals(model: Codec) -> dict[str, float]:
    """Per level, for every level (also those this batch's bandwidth skipped): dead codes now and codes
    replaced since the start."""
    out = {}
    for level, cb in enumerate(model.quantizer.codebooks):
        out[f"dead_now_l{level}"] = float(cb.dead_mask().sum())
        out[f"replaced_total_l{level}"] = float(cb.replaced_total)
    return out


def _check_finite(row: dict, model: Codec, step: int) -> None:
    if not math.isfinite(row["loss"]):
        raise TrainingDiverged(f"diverged at step {step}: the training loss is {row['loss']}")
    for level, cb in enumerate(model.quantizer.codebooks):
        if not torch.isfinite(cb.embed).all():
            raise TrainingDiverged(f"diverged at step {step}: the codebook of level {level} holds NaN or Inf")


@torch.no_grad()
def validate(model: Codec, mel_loss: MultiScaleMelLoss, dataset: AudioDataset, cfg: TrainConfig,
             device: torch.device, quantize: bool = True) -> dict[str, float]:
    """On the first `valid_items` fixed validation windows at `valid_bandwidth`: the loss terms, their raw
    weighted sum (`loss`), SI-SDR and DAC's mel distance (means over windows), and per level the code
    usage and perplexity of all their frames, so every run shows whether and when it left the plateau.
    quantize=False (during a quantizer warm-up): the autoencoder's scores, no codes, codebooks untouched."""
    model.eval()
    n = min(cfg.valid_items, len(dataset))
    sums = {"l1": 0.0, "mel": 0.0, "sisdr": 0.0, "si_sdr": 0.0, "mel_distance": 0.0}
    codes = []
    for first in range(0, n, cfg.batch_size):
        wav = torch.stack([dataset[i] for i in range(first, min(first + cfg.batch_size, n))]).to(device)
        out = model(wav, cfg.valid_bandwidth, quantize=quantize)
        b = wav.shape[0]
        sums["l1"] += float((out.audio - wav).abs().mean()) * b
        sums["mel"] += float(mel_loss(out.audio, wav)) * b
        sums["sisdr"] += float(neg_si_sdr(out.audio, wav)) * b
        sums["si_sdr"] += float(metrics.si_sdr(out.audio[:, 0].cpu(), wav[:, 0].cpu()).sum())
        sums["mel_distance"] += float(metrics.mel_distance(out.audio[:, 0].cpu(), wav[:, 0].cpu(),
                                                           model.config.sample_rate).sum())
        codes.append(out.codes.flatten(1).cpu())
    means = {k: v / n for k, v in sums.items()}
    weights = loss_weights(cfg)
    levels = {}
    if quantize:
        use = metrics.utilization(torch.cat(codes, dim=1), model.config.bins)
        levels = {f"{col}_l{lvl}": float(v) for col in ("used", "perplexity") for lvl, v in zip(use.level, use[col])}
    return {"loss": sum(weights[k] * means[k] for k in ("l1", "mel", "sisdr")), **means,
            "bandwidth": cfg.valid_bandwidth, **levels}


# ---------------------------------------------------------------------------------------------- CLI


def like_overlay(run: str | None, sets: list[str]) -> list[dict[str, Any]]:
    """`--like RUN`: RUN's stored config as the first overlay (none without RUN). Its run_dir is RUN itself, so a
    new one must be set: training into RUN would overwrite its committed tables."""
    if run is None:
        return []
    if not Path(run).is_dir():
        raise UserError(f"--like: {run} is not a run folder; give the folder of a finished run")
    found = read_manifest(run)
    if not isinstance(found, dict) or not isinstance(found.get("config"), dict):
        raise UserError(f"--like: {Path(run) / 'manifest.json'} does not exist or holds no config")
    new_dir = dict(cfglib.parse_set(s) for s in sets).get("run_dir")
    if new_dir is None or Path(new_dir).resolve() == Path(run).resolve():
        raise UserError(f"--like {run}: give the new run its own folder with --set run_dir=FOLDER (not {run})")
    return [found["config"]]


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib train", description="Train a codec run from YAML params.")
    parser.add_argument("params", nargs="*", help="YAML overlays, applied in order over the defaults")
    parser.add_argument("--like", metavar="RUN",
                        help="start from the config stored in RUN's manifest.json (train a run again whose checkpoint "
                             "is lost: checkpoints stay out of git); needs --set run_dir=ANOTHER_FOLDER")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key (value read as YAML); repeatable")
    args = parser.parse_args(argv)
    if not args.params and not args.like:
        parser.error("give YAML params, --like RUN, or both")
    try:
        cfg = cfglib.build(TrainConfig, [*like_overlay(args.like, args.sets),
                                         *(cfglib.read_overlay(p) for p in args.params),
                                         dict(cfglib.parse_set(s) for s in args.sets)])
        run = train(cfg)
    except UserError as e:  # bad params, manifest, checkpoint or run folder (before anything was written); full disk
        print(f"studylib train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the run is marked interrupted, its lock released
        signal, code = processes.stop_signal(e)
        where = e.__notes__[-1] if getattr(e, "__notes__", None) else f"stopped by {signal}"
        print(f"studylib train: {where}", file=sys.stderr)
        return code
    if distributed.is_distributed():
        dist.destroy_process_group()
    return 0 if run.status == "complete" else 1


if __name__ == "__main__":  # torchrun's entry: SIGTERM (torchrun passes it on) stops a rank like Ctrl-C
    processes.raise_on_sigterm()
    sys.exit(cli(sys.argv[1:]))


def finished_on_disk(cfg: TrainConfig) -> bool:
    """Whether `cfg.run_dir` holds this config's run, complete (its manifest says so, under this config's hash) and
    without its checkpoint: a committed run on a fresh checkout. A notebook renders from its files (metrics,
    evaluation) rather than train it again; with its checkpoint there, `train` resumes it (a no-op) as before."""
    run_dir = Path(cfg.run_dir)
    if (run_dir / RunFolder.CHECKPOINT).is_file() or not (run_dir / RunFolder.METRICS).is_file():
        return False
    try:
        manifest = read_manifest(run_dir) or {}
    except ValueError:  # damaged: not a finished run
        return False
    return manifest.get("status") == "complete" and \
        manifest.get("config_hash") == cfglib.config_hash(cfg, exclude=NOT_HASHED)


def train_run(params: list[str], overrides: dict, run_dir: str | Path, nproc_per_node: int = 1):
    """Train (or resume) a codec run from a notebook: in this process, or under torchrun with
    `nproc_per_node` processes (DDP: gloo on CPU, nccl on GPU). Returns the run's metrics table."""

    sets = {**overrides, "run_dir": str(run_dir)}
    cfg = cfglib.build(TrainConfig, [*(cfglib.read_overlay(p) for p in params), sets])
    if finished_on_disk(cfg):  # its checkpoint gone (they stay out of git): the run is complete, not trained again
        return read_parquet(Path(run_dir) / RunFolder.METRICS)
    if nproc_per_node == 1:
        run = train(cfg)
        if run.status != "complete":
            raise RuntimeError(f"training failed: {(read_manifest(run_dir) or {}).get('error')}")
        return run.metrics
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
           "-m", "studylib.training.train", *params]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return read_parquet(Path(run_dir) / RunFolder.METRICS)
