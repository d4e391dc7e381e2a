"""Run files on disk: the one atomic writer, the JSON reader and writer, and the checkpoint loader.

Every file studylib writes (manifests, metrics, checkpoints, evaluation tables, latents, reports) goes
through `atomic_write`, so a reader never sees half a file; every run checkpoint is read through
`read_checkpoint` / `load_checkpoint`, so a bad file gets the same one-line error in every command.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from studylib.config import UserError

if TYPE_CHECKING:  # torch is imported where it is used: reports and corpus use this module without it
    import pandas as pd
    import torch

    from studylib.codec import Codec
    from studylib.train import TrainConfig


# ------------------------------------------------------------------------------------------ writing


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """A table as parquet, written atomically."""
    return atomic_write(Path(path), lambda p: frame.to_parquet(p, index=False))


def save_torch(obj: Any, path: str | Path) -> Path:
    """`torch.save`, written atomically."""
    import torch

    return atomic_write(Path(path), lambda p: torch.save(obj, p))


def write_json(obj: Any, path: str | Path) -> Path:
    """Pretty JSON, written atomically (NaN -> null)."""
    text = json.dumps(_jsonable(obj), indent=2, default=str)
    return atomic_write(Path(path), lambda p: p.write_text(text + "\n"))


def read_json(path: str | Path) -> Any:
    """The JSON in `path`, or None if there is no such file (ValueError if it is not JSON)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# -------------------------------------------------------------------------------------- checkpoints


class UnreadableCheckpoint(UserError):
    """A checkpoint file torch cannot load; `reason` is the loader's error as one short line."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: not a readable checkpoint ({reason})")
        self.path, self.reason = path, reason


def one_line(error: Exception, limit: int = 120) -> str:
    """An exception as a short line: its type and first sentence."""
    text = " ".join(str(error).split()).split(". ")[0][:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, given it or its run folder; FileNotFoundError naming it if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return path


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu", weights_only: bool = False) -> Any:
    """Whatever `torch.load` finds in a checkpoint file (or its run folder's checkpoint.pt);
    UnreadableCheckpoint if it cannot. weights_only=True for files from elsewhere: they must not run code."""
    import torch

    path = checkpoint_path(path)
    try:
        return torch.load(path, map_location=device, weights_only=weights_only)
    except Exception as e:  # zero bytes, text, a truncated zip...: the unpickler's error depends on the bytes
        raise UnreadableCheckpoint(path, one_line(e)) from None


def stored_config(ckpt: Any, path: str | Path) -> TrainConfig:
    """The TrainConfig stored in a run checkpoint; UserError (one line naming the file) if it is not a run
    checkpoint or this studylib cannot read its config."""
    from studylib.train import TrainConfig  # not at the top: train imports this module

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
    from studylib.codec import Codec

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
    """A training run's `manifest.json`, or None if it has none (ValueError if it is not JSON)."""
    return read_json(Path(run_dir) / "manifest.json")
