"""A codec run's folder: the names of the files in it (`RunFolder`) and the readers of its checkpoints.

`runs/<arm>-<config hash>-s<seed>/` holds what training writes (checkpoints, `manifest.json`, `metrics.parquet`),
what evaluation writes (`eval_test*.parquet`, `eval_test.json`, examples) and, under the study runner, its record
(`cell.json`) and report. Every file name is spelled once, here; everything else asks `RunFolder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studylib.core.config import UserError
from studylib.core.storage import UnreadableCheckpoint, one_line, read_json_object, read_torch
from studylib.model.codec import Codec
from studylib.training.run_config import TrainConfig

if TYPE_CHECKING:
    import torch

__all__ = ["RunFolder", "UnreadableCheckpoint", "checkpoint_path", "codec_from_checkpoint", "load_checkpoint",
           "read_checkpoint", "read_manifest", "stored_config", "weights_mismatch"]


@dataclass(frozen=True)
class RunFolder:
    """The files of one codec run folder, by role. The class attributes are the file names; an instance
    gives their paths in `path`."""

    path: Path

    CHECKPOINT = "checkpoint.pt"  # the latest training state (model, optimisers, codebooks, RNG)
    MANIFEST = "manifest.json"  # training's record: status, config, versions, times
    METRICS = "metrics.parquet"  # one row per logged step (train) or validation (valid)
    EVAL_ITEMS = "eval_test.parquet"  # per test window x bandwidth scores of the final checkpoint
    EVAL_LEVELS = "eval_test_levels.parquet"  # per level x bandwidth usage of the final checkpoint
    EVAL_JSON = "eval_test.json"  # the settings the evaluation ran with
    LATENTS = "latents.pt"  # encoder latents (quantizer-only studies)
    CELL = "cell.json"  # the study runner's record of the run
    SUMMARY = "summary.json"  # the report's summary

    # the tables every evaluated codec run has (the runner and the analysis check they read)
    TABLES = (METRICS, EVAL_ITEMS, EVAL_LEVELS)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def eval_items(self) -> Path:
        return self.path / self.EVAL_ITEMS

    @property
    def eval_levels(self) -> Path:
        return self.path / self.EVAL_LEVELS

    @staticmethod
    def milestone_name(step: int) -> str:
        """The checkpoint kept at milestone `step`."""
        return f"checkpoint_step{step}.pt"

    def milestone(self, step: int) -> Path:
        return self.path / self.milestone_name(step)


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, given it or its run folder; FileNotFoundError naming it if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / RunFolder.CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return path



def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Whatever a checkpoint file (or its run folder's checkpoint.pt) holds, loaded without running code
    (`read_torch`); UnreadableCheckpoint if it cannot be read, RefusedFile if it would run code."""
    return read_torch(checkpoint_path(path), device, "checkpoint")



def stored_config(ckpt: Any, path: str | Path) -> TrainConfig:
    """The TrainConfig stored in a run checkpoint; UserError (one line naming the file) if it is not a run
    checkpoint or this studylib cannot read its config."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a studylib run checkpoint (expected keys 'model' and 'config')")
    try:
        return TrainConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: its stored config is not readable by this studylib ({one_line(e)})") from None



def codec_from_checkpoint(ckpt: Any, path: str | Path, device: str | torch.device = "cpu") -> tuple[Codec,
                                                                                                     TrainConfig]:
    """The codec (eval mode) with a run checkpoint's weights, and its config; UserError (one line naming the
    file) if it is not a run checkpoint or its weights do not fit its stored config."""
    cfg = stored_config(ckpt, path)
    codec = Codec(cfg.codec_config()).to(device)
    if problem := weights_mismatch(ckpt["model"], codec.state_dict()):
        raise UserError(f"{path}: the weights do not fit the stored config (model {cfg.model}, quantizer "
                        f"{cfg.quantizer}): {problem}")
    codec.load_state_dict(ckpt["model"])
    return codec.eval(), cfg



def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Codec, TrainConfig, dict]:
    """The codec (eval mode), config and raw checkpoint of a run's `checkpoint.pt` (or its run folder).
    UserError (one line naming the file) if it is unreadable, not a run checkpoint, or its weights do not
    fit its stored config."""
    ckpt = read_checkpoint(path := checkpoint_path(path), device)
    codec, cfg = codec_from_checkpoint(ckpt, path, device)
    return codec, cfg, ckpt



def weights_mismatch(state_dict: dict, expected: dict) -> str | None:
    """How a state dict differs from the one a model expects, in one line (None if its keys and shapes fit):
    torch's own message lists every key, a hundred lines for a model of another size."""
    if not isinstance(state_dict, dict):
        return f"expected a state dict, got {type(state_dict).__name__}"
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [k for k in expected if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(
        expected[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(keys)} {what}" for keys, what in ((shapes, "of another shape"), (missing, "missing"),
                                                       (unexpected, "unexpected")) if keys]
    example = (f"e.g. {shapes[0]} is {list(state_dict[shapes[0]].shape)}, expected {list(expected[shapes[0]].shape)}"
               if shapes else f"e.g. {(missing or unexpected)[0]}")
    return f"{', '.join(parts)} of {len(expected)} tensors ({example})"



def read_manifest(run_dir: str | Path) -> dict | None:
    """A training run's `manifest.json`, or None if it has none (DamagedFile if it is not JSON)."""
    return read_json_object(Path(run_dir) / RunFolder.MANIFEST, "run manifest")
