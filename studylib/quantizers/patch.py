"""The fix as a drop-in: swap the EnCodec-style codebooks of any model for ours, and back.

EnCodec's ``EuclideanCodebook`` (``encodec.quantization.core_vq``) and AudioCraft's identical class hold
their whole state in four buffers (``inited``, ``cluster_size``, ``embed``, ``embed_avg``), and
`studylib.quantizers.ema.EuclideanCodebook` keeps exactly those buffers with the same meaning. So a
codebook can be swapped in place, mid-run, without touching anything else of a user's model, optimizer
or training loop::

    from studylib import ExpiryConfig
    from studylib import patch_codebooks
    patch_codebooks(model, expiry=ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5))

The replacement *takes over the original's buffer tensors* (same objects: same device, dtype and values,
and anything already holding them -- a DDP wrapper, a buffer-averaging helper -- keeps seeing the live
state), plus its decay, epsilon and k-means settings. The state dict of a patched model has the same keys,
shapes and dtypes as before, so checkpoints load strictly into unpatched code, and
`unpatch_codebooks` puts the original modules back (carrying the current state) for code that pickles
whole modules or checks their class.

Patch before wrapping the model in DistributedDataParallel. In ``fixed`` mode with ``expiry.sync`` (the
default) the codebook SUM-all-reduces its statistics across ranks on every step and draws the same
replacements everywhere, so every rank holds the same codebook; ``upstream`` keeps EnCodec's rank-0
broadcasts. Horizon: at decay 0.99 a code that stops being used is flagged by a relative threshold
alpha only after about ln(alpha) / ln(0.99) steps (229 at 0.1), so judge the fix over hundreds of steps.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import importlib.util
import inspect
import math
import sys
import types
import warnings

from torch import nn

from studylib.quantizers.ema import COUNTERS, EuclideanCodebook, ExpiryConfig

__all__ = ["RECOMMENDED_EXPIRY", "codebook_problem", "convert_codebook", "load_audiocraft_quantization",
           "patch_codebooks", "restore_codebook", "unpatch_codebooks"]

# Moshi's rule: dead below 0.1 x the uniform share of usage, checked every 5 steps.
RECOMMENDED_EXPIRY = ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5)

STATE = ("inited", "cluster_size", "embed", "embed_avg")  # EnCodec's persistent buffers, in its order
SETTINGS = ("decay", "epsilon", "kmeans_iters", "threshold_ema_dead_code", "codebook_size")
_ORIGINAL = "_studylib_original"  # attribute of a patched codebook: (the module it replaced,)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _forward_takes_one_input(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return len(required) == 1 and positional[:1] == required


def codebook_problem(module: nn.Module) -> str | None:
    """None if `module` is an EnCodec-style codebook that can be swapped safely, else why not.

    Such a codebook has exactly the persistent buffers ``inited`` [1], ``cluster_size`` [K], ``embed``
    [K, d] and ``embed_avg`` [K, d] (floating point, on one device), no parameters and no submodules, the
    numeric attributes ``decay``, ``epsilon``, ``kmeans_iters``, ``threshold_ema_dead_code`` and
    ``codebook_size`` (== K), and ``forward(x)`` taking one input. Ours (already patched, or native)
    qualifies too.
    """
    if isinstance(module, EuclideanCodebook):
        return None
    buffers = {name: b for name, b in module._buffers.items() if b is not None}
    persistent = {name for name in buffers if name not in module._non_persistent_buffers_set}
    if persistent != set(STATE):
        return f"persistent buffers {sorted(persistent)}, expected {list(STATE)}"
    inited, cluster_size, embed, embed_avg = (buffers[name] for name in STATE)
    if embed.dim() != 2 or embed.shape[0] < 1 or embed.shape[1] < 1:
        return f"embed has shape {tuple(embed.shape)}, expected [K, d]"
    num_codes = embed.shape[0]
    if tuple(embed_avg.shape) != tuple(embed.shape):
        return f"embed_avg has shape {tuple(embed_avg.shape)}, expected {tuple(embed.shape)}"
    if tuple(cluster_size.shape) != (num_codes,):
        return f"cluster_size has shape {tuple(cluster_size.shape)}, expected ({num_codes},)"
    if inited.numel() != 1:
        return f"inited has shape {tuple(inited.shape)}, expected (1,)"
    if not all(t.is_floating_point() for t in (inited, cluster_size, embed, embed_avg)):
        return "its buffers are not all floating point"
    if len({t.device for t in buffers.values()}) != 1:
        return "its buffers are on different devices"
    if any(True for _ in module.parameters()) or len(module._modules) > 0:
        return "it has parameters or submodules (an EnCodec codebook has neither)"
    for name in SETTINGS:
        if not _is_number(getattr(module, name, None)):
            return f"no numeric attribute {name!r}"
    if int(module.codebook_size) != num_codes:
        return f"codebook_size {module.codebook_size} != embed's {num_codes} rows"
    if not _forward_takes_one_input(module):
        return "forward does not take exactly one input x"
    return None


def _root_original(module: nn.Module) -> nn.Module | None:
    held = getattr(module, _ORIGINAL, None)
    return held[0] if held else None


def convert_codebook(module: nn.Module, expiry: ExpiryConfig = RECOMMENDED_EXPIRY,
                     init_fix: bool | None = None) -> EuclideanCodebook:
    """Our codebook in place of one EnCodec-style `module` (see `codebook_problem`), sharing its state.

    The new module takes over the original's four buffer tensors and its settings; the original is kept,
    out of the module tree and without its buffers, for `restore_codebook`. Converting one of ours gives a
    new one with the new expiry that shares the old one's state and counters and restores to the same
    original. In ``upstream`` mode the threshold is the module's own ``threshold_ema_dead_code`` (that
    mode is "exactly what your model did": a control). `init_fix` matters only for a codebook not yet
    initialised (see `studylib.quantizers.ema.EuclideanCodebook`).
    """
    problem = codebook_problem(module)
    if problem is not None:
        raise TypeError(f"not an EnCodec-style codebook ({type(module).__qualname__}): {problem}")
    if not isinstance(expiry, ExpiryConfig):
        raise TypeError(f"expiry: got {type(expiry).__name__}, expected studylib.quantizers.ema.ExpiryConfig")
    ours_before = module if isinstance(module, EuclideanCodebook) else None
    original = _root_original(module) if ours_before is not None else module
    if original is None:  # a native one of ours: converting back gives it, with its old expiry
        original = module

    if expiry.mode == "upstream":
        own = getattr(original, "threshold_ema_dead_code", None)
        if own is None and ours_before is not None and ours_before.expiry.mode == "upstream":
            own = ours_before.expiry.threshold
        if own is not None:
            expiry = dataclasses.replace(expiry, threshold=float(own))

    state = {name: module._buffers[name] for name in STATE}
    embed = state["embed"]
    inited = bool(state["inited"].item())
    kmeans_iters = getattr(module, "kmeans_iters", None)
    if inited and not (isinstance(kmeans_iters, int) and kmeans_iters >= 1):
        kmeans_iters = 1  # never used: no k-means will run
    generator = ours_before.generator if ours_before is not None else None
    # kmeans_init=True: a zero placeholder, no random draw (the global RNG must stay untouched).
    ours = EuclideanCodebook(int(embed.shape[1]), int(embed.shape[0]), decay=float(module.decay),
                             epsilon=float(module.epsilon), kmeans_init=True, kmeans_iters=kmeans_iters,
                             expiry=expiry, init_fix=init_fix, generator=generator)
    for name, tensor in state.items():
        ours._buffers[name] = tensor
    for name in COUNTERS:
        ours._buffers[name] = (ours_before._buffers[name] if ours_before is not None
                               else ours._buffers[name].to(embed.device))
    ours.train(module.training)

    if any(getattr(module, hooks, None) for hooks in _HOOKS):
        warnings.warn(f"{type(module).__qualname__} has hooks; they stay on the replaced module and do not run "
                      "on its replacement", stacklevel=2)
    if ours_before is None:
        for name in STATE:  # the kept original must not pin the tensors once they move
            module._buffers[name] = None
    object.__setattr__(ours, _ORIGINAL, (original,))
    return ours


def restore_codebook(module: EuclideanCodebook) -> nn.Module:
    """The module a patched codebook replaced, now holding the patched one's current buffer tensors.

    For one of ours that replaced nothing (a native codebook of this library) it returns `module`.
    """
    original = _root_original(module)
    if original is None:
        return module
    for name in STATE:
        original._buffers[name] = module._buffers[name]
    if isinstance(original, EuclideanCodebook):
        for name in COUNTERS:
            original._buffers[name] = module._buffers[name]
    original.train(module.training)
    return original


def _near_miss(module: nn.Module) -> bool:
    names = module._buffers.keys()
    return "embed" in names or "cluster_size" in names or "codebook" in type(module).__name__.lower()


def _swap_children(model: nn.Module, choose) -> int:
    """Replace every child c of every module of `model` for which choose(c) gives a module; the same
    child reachable from several parents gets one replacement. Returns the number of distinct children."""
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                new = choose(child)
                if new is None:
                    continue
                done[id(child)] = new
            parent._modules[name] = done[id(child)]
    return len(done)


def patch_codebooks(model: nn.Module, expiry: ExpiryConfig = RECOMMENDED_EXPIRY,
                    init_fix: bool | None = None) -> int:
    """Replace every EnCodec-style codebook inside `model` by ours with `expiry`; returns how many.

    Works on any ``nn.Module`` (EnCodec's and AudioCraft's models, their derivatives, a DDP-wrapped
    model's ``.module``); modules that do not look like such a codebook (`codebook_problem`) are left
    alone, and a model with none raises ValueError naming the near misses. Each replacement carries its
    codebook's current state (the same tensors, so the same device and dtype) and settings; the model's
    state dict keeps its keys, shapes and dtypes. Patching a patched model switches its expiry.
    Default `expiry`: `RECOMMENDED_EXPIRY` (relative threshold 0.1, checked every 5 steps; Moshi's rule).
    `init_fix` (default: on in ``fixed`` mode) only affects codebooks whose k-means has not run yet.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_codebooks: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(expiry, ExpiryConfig):
        raise TypeError(f"expiry: got {type(expiry).__name__}, expected studylib.quantizers.ema.ExpiryConfig")
    if codebook_problem(model) is None:
        raise TypeError("patch_codebooks: the model is itself a codebook and cannot be replaced in place; "
                        "use `codebook = studylib.quantizers.patch.convert_codebook(codebook, expiry)`")

    def choose(child: nn.Module) -> nn.Module | None:
        return convert_codebook(child, expiry, init_fix) if codebook_problem(child) is None else None

    count = _swap_children(model, choose)
    if count == 0:
        misses = [f"{name or '<model>'} ({type(m).__qualname__}): {codebook_problem(m)}"
                  for name, m in model.named_modules() if _near_miss(m)]
        hint = ("; close but left alone: " + "; ".join(misses[:8])) if misses else ""
        raise ValueError(
            f"patch_codebooks: no EnCodec-style codebook in {type(model).__qualname__} (a module with buffers "
            f"inited [1], cluster_size [K], embed [K, d], embed_avg [K, d], the attributes {', '.join(SETTINGS)} "
            f"and forward(x), as encodec.quantization.core_vq.EuclideanCodebook){hint}")
    return count


def unpatch_codebooks(model: nn.Module) -> int:
    """Put back the modules `patch_codebooks` replaced, each holding the current state; returns how many.

    The restored modules are the original objects (their class, settings and hooks), so they behave as
    before patching, EnCodec's expiry included. Codebooks of this library that replaced nothing stay.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_codebooks: expected an nn.Module, got {type(model).__name__}")

    def choose(child: nn.Module) -> nn.Module | None:
        if isinstance(child, EuclideanCodebook) and _root_original(child) not in (None, child):
            return restore_codebook(child)
        return None

    return _swap_children(model, choose)


# ------------------------------------------------------------------------------------ AudioCraft


AUDIOCRAFT_INSTALL = ("`make setup` installs it: flashy from the dev extras, then "
                      "`pip install --no-deps -r requirements-audiocraft.txt`")


def load_audiocraft_quantization() -> types.ModuleType:
    """AudioCraft's ``audiocraft.quantization`` package, imported without running ``audiocraft/__init__.py``.

    Why: AudioCraft's top-level ``__init__`` imports its data, modules and models (MusicGen's dependencies:
    av, transformers, xformers, ... and a torch==2.1.0 pin), which this project does not install, while
    ``audiocraft/quantization/{base,core_vq,vq}.py`` need only torch, einops and flashy. So, unless the real
    package is already imported, an empty stand-in module named ``audiocraft`` that carries only the
    installed package's ``__path__`` goes into ``sys.modules`` and the subpackage is imported under it:
    the classes are AudioCraft's own code with their real module names (``audiocraft.quantization.core_vq``).
    The stand-in stays, so later ``import audiocraft.quantization`` finds the same modules; nothing else of
    AudioCraft is reachable through it in this process. Raises ModuleNotFoundError with the install command
    when AudioCraft or flashy is missing (and leaves no half-imported ``audiocraft`` behind).
    """
    if "audiocraft" not in sys.modules:
        spec = importlib.util.find_spec("audiocraft")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"AudioCraft is not installed; {AUDIOCRAFT_INSTALL}", name="audiocraft")
        stand_in = types.ModuleType("audiocraft", "Stand-in for AudioCraft's package (studylib.quantizers.patch): "
                                    "its __init__ was not run; only subpackages can be imported through it.")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("audiocraft", None, is_package=True)
        stand_in.__spec__.submodule_search_locations = stand_in.__path__ = list(spec.submodule_search_locations)
        sys.modules["audiocraft"] = stand_in
    try:
        return importlib.import_module("audiocraft.quantization")
    except ImportError as err:
        if getattr(sys.modules.get("audiocraft"), "__file__", None) is None:  # ours: take it back out
            for name in [n for n in sys.modules if n == "audiocraft" or n.startswith("audiocraft.")]:
                del sys.modules[name]
        raise ModuleNotFoundError(f"AudioCraft's quantizer does not import ({err}); {AUDIOCRAFT_INSTALL}",
                                  name=err.name) from err
