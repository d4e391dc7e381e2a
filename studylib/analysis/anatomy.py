"""The bug at unit level: five small experiments on single codebooks, run live against encodec 0.1.1.

EnCodec's ``EuclideanCodebook.forward`` (training) runs ``expire_codes_`` -- which writes batch frames
into ``embed`` for every code whose EMA usage ``cluster_size`` is below 2 -- and then the EMA update,
whose last line rebuilds ``embed`` from ``embed_avg / cluster_size``. The expiry never touched those
two, so its write is gone by the time ``forward`` returns
(https://github.com/facebookresearch/encodec/issues/61). Each function below measures one face of it and
returns a tidy table (plus a few typed summary numbers); no plotting here, the notebook
``notebooks/01_bug_anatomy.ipynb`` draws them.

* `expiry_writes_vanish` -- the replacement rows exist right after ``expire_codes_`` and not after the
  step; the codebook ends bit-identical to a twin whose expiry writes nothing. Ours in ``fixed`` mode
  keeps them.
* `buggy_equals_none` -- ``upstream`` (encodec bit for bit) and ``none`` train to the same bits.
* `kmeans_shrink` -- k-means stores means where the EMA expects sums: codes shrink by (0.99 + 0.01 c) / c.
* `dead_code_arithmetic` -- 600 frames per step against 1024 codes at threshold 2 flag >= 724 codes.
* `rank0_broadcast` -- under torch.distributed, rank 0's buffers are broadcast and nothing is reduced.

EnCodec's code is imported from the installed package inside the functions (never copied here).
Frames come from `frames`: a fixed Gaussian mixture whose centres drift slowly, so usage shifts and
codes die, deterministic per (seed, stream, step). The experiments run on `THREADS` torch threads (then
restore the caller's setting): their many small ops gain nothing from two threads, and on a machine
whose cores are busy MKL oversubscription makes them several times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from studylib.analysis import reports
from studylib.quantizers.ema import EuclideanCodebook, ExpiryConfig

ISSUE = "https://github.com/facebookresearch/encodec/issues/61"
BUFFERS = ("inited", "cluster_size", "embed", "embed_avg")
KMEANS_BUDGET = 8e7  # encodec's k-means materialises an n x K x d tensor: above this, use our bit-exact one
KMEANS_SHRINK_LIMIT = 4 * KMEANS_BUDGET  # kmeans_shrink always runs encodec's own: refused above this
# The working expiry the fixed arms use here: Moshi's rule. A code is dead below 0.1 x the uniform usage
# sum / K and restarts at the uniform usage, so one unused EMA step (x 0.99) cannot flag it again.
# (At EnCodec's absolute threshold 2 with 600 frames per step a replaced code cannot reach usage 2:
# a working expiry would thrash, replacing >= 724 codes every step.)
FIXED = ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative")
# For rank0_broadcast: EnCodec's threshold 2, replacements survive (usage reset to 2) -- thrash, but in sync.
FIXED_EVERY_STEP = ExpiryConfig(mode="fixed", threshold=2.0, replaced_usage=2.0)
THREADS = 1  # torch threads while an experiment runs (None: leave the caller's setting)


@contextlib.contextmanager
def _threads(num: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if num is not None:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _experiment(fn: Callable) -> Callable:
    """Run `fn` on `THREADS` threads (restored afterwards) with denormals flushed, as everything in the
    study runs (decaying EMA usages of unused codes would otherwise reach slow denormal floats)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        torch.set_flush_denormal(True)
        with _threads(THREADS):
            return fn(*args, **kwargs)

    return run


def _encodec_core():
    """encodec's `core_vq` module, imported lazily so the rest of studylib works without it."""
    try:
        from encodec.quantization import core_vq
    except ImportError as err:  # pragma: no cover - the study's environment pins it
        raise ImportError("studylib.analysis.anatomy runs encodec's own codebook live: "
                          "pip install encodec==0.1.1") from err
    return core_vq


def frames(step: int, n: int, dim: int, seed: int = 0, drift: float = 0.01, stream: int = 0,
           components: int = 32, noise: float = 0.5) -> torch.Tensor:
    """Deterministic frames [n, dim]: a mixture of `components` unit-variance Gaussian centres (fixed by
    `seed`) plus `noise` x N(0, I), all centres moved by `drift` x step along one fixed direction.
    `stream` gives independent draws from the same distribution (e.g. one per rank)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(components, dim, generator=g)
    direction = torch.randn(dim, generator=g)
    g.manual_seed((seed * 1_000_003 + stream * 100_003 + step + 1) % 2**62)
    comp = torch.randint(0, components, (n,), generator=g)
    return centres[comp] + noise * torch.randn(n, dim, generator=g) + (drift * step) * direction


def _rows_in(rows: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """bool [r]: row i of `rows` is bit for bit one of `batch`'s rows (an EMA average never is)."""
    keys = {r.tobytes() for r in batch.detach().contiguous().numpy()}
    return torch.tensor([r.tobytes() in keys for r in rows.detach().contiguous().numpy()], dtype=torch.bool)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _init(codebook: torch.nn.Module, x: torch.Tensor) -> None:
    """k-means on `x` without an EMA step: both implementations initialise in forward even in eval mode."""
    codebook.eval()
    with torch.no_grad():
        codebook(x)
    codebook.train()


# ------------------------------------------------------------------------ a. the expiry's writes vanish


@dataclass(frozen=True)
class ExpiryWrites:
    """`expiry_writes_vanish`: one row per (mode, step) in `table`, and the headline numbers."""

    table: pd.DataFrame
    replaced_upstream: int  # codes encodec's expiry replaced, all steps
    replaced_rows_surviving_upstream: int  # of those, rows still equal to their frame after the step (0)
    identical_to_twin: bool  # encodec's buffers and outputs == a twin whose expiry writes nothing, every step
    replaced_fixed: int
    fixed_replaced_are_frames: bool  # every fixed replacement is a batch frame after the step
    fixed_alive_next_step: bool  # ... and alive (usage >= threshold, or used) after the next EMA step


@_experiment
def expiry_writes_vanish(n: int = 600, codebook_size: int = 1024, dim: int = 128, steps: int = 200, seed: int = 0,
                         threshold: float = 2.0, kmeans_iters: int = 5, drift: float = 0.01,
                         fixed: ExpiryConfig = FIXED) -> ExpiryWrites:
    """Spy on encodec's `expire_codes_` inside `forward`, then on our `fixed` expiry.

    encodec: after k-means init, `steps` training steps. Each step snapshots `embed` right after
    `expire_codes_` (the replaced rows are batch frames there) and after `forward` returns (they are
    not), and runs a twin (a deep copy after init) whose `replace_` draws the same samples from the same
    RNG state but writes nothing: outputs and all four buffers stay `torch.equal` to the original.
    fixed: the replaced codes are batch frames after the step and still alive after the next one.

    Columns: mode, step, replaced, frames_after_expiry, frames_after_step, alive_next_step,
    identical_to_twin (encodec only).
    """
    core_vq = _encodec_core()
    rows: list[dict] = []

    # --- encodec, live ---------------------------------------------------------------------------
    torch.manual_seed(seed)
    theirs = core_vq.EuclideanCodebook(dim, codebook_size, kmeans_init=True, kmeans_iters=kmeans_iters,
                                       threshold_ema_dead_code=threshold)
    _init(theirs, frames(0, n, dim, seed, drift))
    twin = copy.deepcopy(theirs)
    # The twin's expiry decides as encodec does and draws encodec's K samples (same RNG consumption) but
    # does not write them: what the bug makes of every replacement.
    twin.replace_ = lambda samples, mask: core_vq.sample_vectors(samples, twin.codebook_size)

    spy: dict[str, torch.Tensor] = {}
    expire = theirs.expire_codes_

    def spying_expire(batch_samples: torch.Tensor) -> None:
        spy["mask"] = theirs.cluster_size < theirs.threshold_ema_dead_code  # encodec's test, pre-EMA usage
        expire(batch_samples)
        spy["embed"] = theirs.embed.clone()  # what the expiry wrote, before the EMA overwrites it

    theirs.expire_codes_ = spying_expire
    previous: torch.Tensor | None = None
    for step in range(steps):
        x = frames(step + 1, n, dim, seed, drift)
        rng = torch.get_rng_state()
        q, ind = theirs(x)
        rng_after = torch.get_rng_state()
        torch.set_rng_state(rng)
        q_twin, ind_twin = twin(x)
        identical = (torch.equal(rng_after, torch.get_rng_state()) and torch.equal(q, q_twin)
                     and torch.equal(ind, ind_twin)
                     and all(torch.equal(getattr(theirs, b), getattr(twin, b)) for b in BUFFERS))
        mask = spy["mask"]
        if previous is not None:  # the previous step's replaced codes, after this step's EMA
            alive = ~(theirs.cluster_size < threshold) | (torch.bincount(ind, minlength=codebook_size) > 0)
            rows[-1]["alive_next_step"] = int((previous & alive).sum())
        # THE BUG (encodec#61): right after expire_codes_ the rows are batch frames; after forward they
        # are embed_avg / smoothed cluster_size again, which the expiry never touched.
        rows.append({"mode": "encodec", "step": step, "replaced": int(mask.sum()),
                     "frames_after_expiry": int(_rows_in(spy["embed"][mask], x).sum()),
                     "frames_after_step": int(_rows_in(theirs.embed[mask], x).sum()),
                     "alive_next_step": pd.NA, "identical_to_twin": identical})
        previous = mask

    # --- ours, fixed -----------------------------------------------------------------------------
    ours = EuclideanCodebook(dim, codebook_size, kmeans_iters=kmeans_iters, expiry=fixed,
                             generator=torch.Generator().manual_seed(seed))
    _init(ours, frames(0, n, dim, seed, drift))
    expire_fixed = ours._expire_fixed

    def spying_fixed(x: torch.Tensor) -> None:
        spy["dead"] = ours.dead_mask().clone()  # after this step's EMA: exactly the codes it replaces
        expire_fixed(x)

    ours._expire_fixed = spying_fixed
    previous = None
    for step in range(steps):
        x = frames(step + 1, n, dim, seed, drift)
        spy.pop("dead", None)
        _, ind = ours(x)
        dead = spy.get("dead", ours.dead_mask())  # no check this step (`every` > 1): judge by the state
        if previous is not None:
            alive = ~dead | (torch.bincount(ind, minlength=codebook_size) > 0)
            rows[-1]["alive_next_step"] = int((previous & alive).sum())
        replaced = dead if "dead" in spy else torch.zeros_like(dead)
        in_batch = int(_rows_in(ours.embed[replaced], x).sum())
        rows.append({"mode": "fixed", "step": step, "replaced": int(replaced.sum()),
                     "frames_after_expiry": in_batch, "frames_after_step": in_batch,
                     "alive_next_step": pd.NA, "identical_to_twin": pd.NA})
        previous = replaced

    table = pd.DataFrame(rows).astype({"alive_next_step": "Int64", "identical_to_twin": "boolean"})
    enc, fix = table[table["mode"] == "encodec"], table[table["mode"] == "fixed"]
    fix_next = fix.dropna(subset=["alive_next_step"])
    return ExpiryWrites(
        table=table,
        replaced_upstream=int(enc.replaced.sum()),
        replaced_rows_surviving_upstream=int(enc.frames_after_step.sum()),
        identical_to_twin=bool(enc.identical_to_twin.all()),
        replaced_fixed=int(fix.replaced.sum()),
        fixed_replaced_are_frames=bool((fix.frames_after_step == fix.replaced).all()),
        fixed_alive_next_step=bool((fix_next.alive_next_step == fix_next.replaced).all()),
    )


# ------------------------------------------------------------------------------ b. upstream == none


def _compare(step: int, comparison: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
             replaced: int) -> list[dict]:
    return [{"step": step, "comparison": comparison, "buffer": name, "max_abs_diff": _max_abs_diff(a[name], b[name]),
             "equal": torch.equal(a[name], b[name]), "upstream_replaced": replaced} for name in a]


def _state(codebook: torch.nn.Module, quantize: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{b: getattr(codebook, b).clone() for b in BUFFERS}, "quantize": quantize, "codes": codes}


@_experiment
def buggy_equals_none(n: int = 600, codebook_size: int = 1024, dim: int = 128, steps: int = 200, seed: int = 0,
                      kmeans_iters: int = 5, drift: float = 0.01) -> pd.DataFrame:
    """Train side by side on the same drifting frames, one step at a time:

    * ``upstream vs none``: our two modes, each with its own generator seeded `seed`. The expiry's only
      lasting effect is the random numbers it draws; with per-codebook generators those are private,
      so every buffer and output is bit-identical at every step (max_abs_diff 0).
    * ``upstream vs encodec``: our `upstream` (global RNG) against encodec's codebook from the same global
      seed, each step started from the same RNG state: outputs, buffers and the RNG state afterwards
      are `torch.equal` (the `rng_state` row).

    Tidy: step, comparison, buffer (the four buffers, quantize, codes, rng_state), max_abs_diff, equal,
    upstream_replaced (codes `upstream` replaced that step, for nothing).
    """
    core_vq = _encodec_core()
    up = EuclideanCodebook(dim, codebook_size, kmeans_iters=kmeans_iters, expiry=ExpiryConfig(mode="upstream"),
                           generator=torch.Generator().manual_seed(seed)).train()
    none = EuclideanCodebook(dim, codebook_size, kmeans_iters=kmeans_iters, expiry=ExpiryConfig(mode="none"),
                             generator=torch.Generator().manual_seed(seed)).train()
    torch.manual_seed(seed)
    theirs = core_vq.EuclideanCodebook(dim, codebook_size, kmeans_init=True, kmeans_iters=kmeans_iters,
                                       threshold_ema_dead_code=2).train()
    ours = EuclideanCodebook(dim, codebook_size, kmeans_iters=kmeans_iters,
                             expiry=ExpiryConfig(mode="upstream")).train()  # generator None: encodec's draws
    rows: list[dict] = []
    for step in range(steps):
        x = frames(step, n, dim, seed, drift)
        a, b = _state(up, *up(x)), _state(none, *none(x))
        rows += _compare(step, "upstream vs none", a, b, int(up.replaced_last))
        rng = torch.get_rng_state()
        t = _state(theirs, *theirs(x))
        t["rng_state"] = torch.get_rng_state()
        torch.set_rng_state(rng)
        o = _state(ours, *ours(x))
        o["rng_state"] = torch.get_rng_state()
        rows += _compare(step, "upstream vs encodec", o, t, int(ours.replaced_last))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ c. k-means shrink


@dataclass(frozen=True)
class KMeansShrink:
    """`kmeans_shrink`: one row per (mode, code) in `table`; medians over codes with count >= 1."""

    table: pd.DataFrame
    median_ratio_over_theory: dict[str, float]  # mode -> median(ratio / theory); ~1 for both
    median_ratio: dict[str, float]  # mode -> median(ratio); < 1 for encodec, ~1 for init_fix
    empty_codes: int  # codes k-means left empty (count 0): encodec blows them up by ~0.99 / eps


def _smoothed(cluster_size: torch.Tensor, epsilon: float) -> torch.Tensor:
    """encodec's Laplace-smoothed usage, laplace_smoothing(c) x sum(c)."""
    total = cluster_size.sum()
    return (cluster_size + epsilon) / (total + cluster_size.numel() * epsilon) * total


@_experiment
def kmeans_shrink(n: int = 2400, codebook_size: int = 256, dim: int = 128, seed: int = 0,
                  kmeans_iters: int = 5, epsilon: float = 1e-5) -> KMeansShrink:
    """k-means init on one batch, then one EMA step on a fresh batch of the same (stationary) distribution.

    encodec stores the k-means means in `embed_avg`, which the EMA treats as sums: a code with count c
    and mean m gets embed_avg = 0.99 m + 0.01 (sum of its new frames ~ c m), usage ~ c, so
    |embed_after| / |embed_before| = (0.99 + 0.01 c) / c. Ours with ``init_fix=True`` stores m x c: ratio 1.
    `theory` is that prediction with encodec's Laplace smoothing (it matters only for c = 0, where an
    unused empty code is divided by ~eps: a ~1e5-fold blow-up). Defaults n x K x d = 7.9e7 keep
    encodec's materialised k-means tensor small while codes get ~10 frames each.

    Columns: mode, code, count (k-means), count_next (frames in the EMA step), norm_before, norm_after,
    ratio, theory.
    """
    core_vq = _encodec_core()
    if n * codebook_size * dim > KMEANS_SHRINK_LIMIT:
        raise ValueError(f"n x codebook_size x dim = {n * codebook_size * dim:.1e}: encodec's k-means would "
                         f"materialise that many floats per iteration; allowed at most {KMEANS_SHRINK_LIMIT:.1e} "
                         f"(4 x KMEANS_BUDGET: kmeans_shrink has no bit-exact fallback)")
    x0, x1 = frames(0, n, dim, seed, drift=0.0), frames(1, n, dim, seed, drift=0.0)
    torch.manual_seed(seed)
    theirs = core_vq.EuclideanCodebook(dim, codebook_size, kmeans_init=True, kmeans_iters=kmeans_iters,
                                       epsilon=epsilon, threshold_ema_dead_code=0)  # no expiry: shrink alone
    ours = EuclideanCodebook(dim, codebook_size, kmeans_iters=kmeans_iters, epsilon=epsilon,
                             expiry=ExpiryConfig(mode="none"), init_fix=True,
                             generator=torch.Generator().manual_seed(seed))
    tables = []
    for mode, cb in (("encodec", theirs), ("init_fix", ours)):
        _init(cb, x0)
        count = cb.cluster_size.clone()
        before = cb.embed.norm(dim=1)
        _, ind = cb(x1)
        c = count.double()
        stored = torch.ones_like(c) if mode == "encodec" else c  # embed_avg holds m, or m x c
        # Assume the new step brings the same count c and the same mean: EMA sums and usage.
        theory = (0.99 * stored + 0.01 * c) / _smoothed(c, epsilon)
        tables.append(pd.DataFrame({
            "mode": mode, "code": range(codebook_size), "count": count.long().numpy(),
            "count_next": torch.bincount(ind, minlength=codebook_size).numpy(),
            "norm_before": before.numpy(), "norm_after": cb.embed.norm(dim=1).numpy(),
            "ratio": (cb.embed.norm(dim=1) / before).numpy(), "theory": theory.numpy()}))
    table = pd.concat(tables, ignore_index=True)
    hit = table[table["count"] >= 1]
    return KMeansShrink(
        table=table,
        median_ratio_over_theory={m: float((g.ratio / g.theory).median()) for m, g in hit.groupby("mode")},
        median_ratio={m: float(g.ratio.median()) for m, g in hit.groupby("mode")},
        empty_codes=int((table[table["mode"] == "encodec"]["count"] == 0).sum()),
    )


# ----------------------------------------------------------------------------- d. dead-code arithmetic


@_experiment
def dead_code_arithmetic(n: int = 600, codebook_size: int = 1024, dim: int = 128, steps: int = 200, seed: int = 0,
                         threshold: float = 2.0, relative: float = 0.1, large_n: int | None = 4800,
                         kmeans_iters: int = 5, drift: float = 0.01) -> pd.DataFrame:
    """How many codes each rule flags per step, at `n` and at `large_n` frames per step.

    EMA usages sum to the frames per step n (each step adds n x 0.01, decays the sum by 0.99), so at most
    floor(n / threshold) codes can have usage >= threshold: at n = 600, K = 1024, threshold 2, at least
    724 codes are "dead" on every step, whatever the data. The floor falls to 0 at n = 4800 -- the
    absolute threshold means something else at every batch size. Moshi's relative rule (usage below
    `relative` x sum / K) has floor max(0, K - K / relative) = 0 at any n.

    encodec's own codebook runs where its k-means fits (n x K x d <= KMEANS_BUDGET), else our `upstream`
    (bit-exact with encodec, see `buggy_equals_none`); the `implementation` column says which.
    Tidy: frames, implementation, step, rule, threshold (in frames), dead, floor, usage_sum.
    """
    core_vq = _encodec_core()
    rows: list[dict] = []
    # At most K / relative codes can reach relative x sum / K: no floor for relative <= 1.
    relative_floor = max(0, codebook_size - math.floor(codebook_size / relative)) if relative > 0 else 0
    for size in (n,) if large_n is None else (n, large_n):
        absolute_floor = max(0, codebook_size - math.floor(size / threshold)) if threshold > 0 else 0
        torch.manual_seed(seed)
        if size * codebook_size * dim <= KMEANS_BUDGET:
            implementation = "encodec"
            cb = core_vq.EuclideanCodebook(dim, codebook_size, kmeans_init=True, kmeans_iters=kmeans_iters,
                                           threshold_ema_dead_code=threshold)
        else:
            implementation = "upstream"
            cb = EuclideanCodebook(dim, codebook_size, kmeans_iters=kmeans_iters,
                                   expiry=ExpiryConfig(mode="upstream", threshold=threshold))
        cb.train()
        for step in range(steps):
            cb(frames(step, size, dim, seed, drift))
            usage = cb.cluster_size  # what the next step's expiry compares (encodec: pre-EMA values)
            total = float(usage.sum())
            for rule, value, floor in (("absolute", threshold, absolute_floor),
                                       ("relative", relative * total / codebook_size, relative_floor)):
                rows.append({"frames": size, "implementation": implementation, "step": step, "rule": rule,
                             "threshold": value, "dead": int((usage < value).sum()), "floor": floor,
                             "usage_sum": total})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------- e. rank-0 broadcast

DDP_MODES = ("upstream", "none", "fixed")


def rank0_broadcast(n: int = 600, codebook_size: int = 1024, dim: int = 128, steps: int = 200, seed: int = 0,
                    kmeans_iters: int = 5, drift: float = 0.01, work_dir: str | Path | None = None,
                    fixed: ExpiryConfig = FIXED_EVERY_STEP, timeout: float = 600.0) -> pd.DataFrame:
    """Two ranks (gloo, CPU, torchrun), different frames per rank, one codebook per mode on each.

    * ``upstream`` (encodec's behaviour): every expiry broadcasts rank 0's buffers, then each rank applies
      the EMA of its own frames -- nothing all-reduces cluster_size / embed_avg -- so the ranks differ at
      the end of every step, and rank 1's statistics are thrown away at the next broadcast.
    * ``none``: synchronised once after k-means, then the ranks drift apart for good.
    * ``fixed`` with sync: statistics SUM-all-reduced, replacement frames identical: difference 0. By
      default at EnCodec's absolute threshold 2, so that hundreds of codes are replaced on every step
      (at least K - n of them: the synchronised usage sums to both ranks' 2n frames) and the ranks still agree.

    Per step and buffer, the largest |rank 0 - rank r| (measured by the workers with an all_gather after
    each step). The workers write `work_dir/rank{r}.parquet` (a temporary folder when None); the table is
    read back from them. Tidy: mode, step, buffer, max_abs_diff, replaced_rank0, replaced_rank1.
    """
    _encodec_core()  # the comparison is about encodec's behaviour; fail early with the install hint
    if n >= 2.0 * codebook_size:
        # encodec broadcasts only on ranks that found a dead code; at n >= threshold x K one rank may find
        # none while the other waits in the broadcast forever. Below it the floor guarantees dead codes.
        raise ValueError(f"n = {n} >= 2 x codebook_size: upstream's rank-0 broadcast could deadlock; use fewer frames")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(work_dir) if work_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        root = str(Path(__file__).resolve().parents[2])
        env = os.environ | {"OMP_NUM_THREADS": "1",
                            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        # Knobs travel as one JSON argument: torchrun's own parser would claim options such as --n.
        knobs = {"n": n, "codebook_size": codebook_size, "dim": dim, "steps": steps, "seed": seed,
                 "kmeans_iters": kmeans_iters, "drift": drift,
                 "fixed": {k: getattr(fixed, k) for k in ("threshold", "threshold_kind", "every", "replaced_usage")}}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "studylib.analysis.anatomy", str(out), json.dumps(knobs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks = [pd.read_parquet(out / f"rank{r}.parquet") for r in (0, 1)]
    keys = ["mode", "step", "buffer"]
    if not ranks[0][[*keys, "max_abs_diff"]].equals(ranks[1][[*keys, "max_abs_diff"]]):
        raise RuntimeError("the two ranks measured different rank differences")
    table = ranks[0][[*keys, "max_abs_diff"]].copy()
    for r, frame in enumerate(ranks):
        table[f"replaced_rank{r}"] = frame["replaced"].to_numpy()
    return table


def _ddp_worker(argv: Sequence[str]) -> None:
    """One rank of `rank0_broadcast` (run under torchrun)."""
    import torch.distributed as dist

    if len(argv) != 2:
        raise SystemExit("usage: torchrun --nproc_per_node 2 -m studylib.analysis.anatomy OUT_DIR KNOBS_JSON")
    out_dir, args = Path(argv[0]), argparse.Namespace(**json.loads(argv[1]))
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    expiries = {"upstream": ExpiryConfig(mode="upstream"), "none": ExpiryConfig(mode="none"),
                "fixed": ExpiryConfig(mode="fixed", sync=True, **args.fixed)}
    rows = []
    for mode in DDP_MODES:
        # Different generators per rank: fixed mode must stay identical without relying on equal draws.
        cb = EuclideanCodebook(args.dim, args.codebook_size, kmeans_iters=args.kmeans_iters, expiry=expiries[mode],
                               generator=torch.Generator().manual_seed(args.seed + rank)).train()
        for step in range(args.steps):
            cb(frames(step, args.n, args.dim, args.seed, args.drift, stream=rank))  # each rank its own frames
            for name in BUFFERS:
                buf = getattr(cb, name).contiguous()
                copies = [torch.empty_like(buf) for _ in range(world)]
                dist.all_gather(copies, buf)
                diff = max(_max_abs_diff(copies[0], other) for other in copies[1:])
                rows.append({"mode": mode, "step": step, "buffer": name, "max_abs_diff": diff,
                             "replaced": int(cb.replaced_last), "rank": rank})
    reports.save_table(pd.DataFrame(rows), out_dir, f"rank{rank}")
    dist.barrier()
    dist.destroy_process_group()




def plot_dead_codes(dead: pd.DataFrame, codebook_size: int, colors: dict[str, str]):
    """`dead_code_arithmetic` as a figure: one panel per frames-per-step, codes flagged dead by the absolute
    (`colors["absolute"]`) and the relative rule (`colors["relative"]`) over steps, the absolute rule's floor
    K - floor(n / 2) dashed, K dotted."""
    import matplotlib.pyplot as plt

    sizes = sorted(dead.frames.unique())
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 3.8), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = dead[dead.frames == size]
        for rule, label in (("absolute", "usage < 2 (EnCodec)"), ("relative", "usage < 0.1 x sum / K (Moshi)")):
            r = rows[rows.rule == rule]
            ax.plot(r.step, r.dead, color=colors[rule], lw=1.5, label=label)
        floor = int(rows[rows.rule == "absolute"].floor.iloc[0])
        ax.axhline(floor, color=colors["absolute"], ls="--", lw=1, label="floor of usage < 2: K - floor(n / 2)")
        ax.axhline(codebook_size, color="black", ls=":", lw=0.8, label="K")
        impl = "encodec 0.1.1" if rows.implementation.iloc[0] == "encodec" else "our upstream = encodec bit for bit"
        ax.set(title=f"n = {size} frames per step, floor {floor}\n({impl})", xlabel="step",
               ylabel="codes flagged dead", ylim=(-20, codebook_size * 1.05))
    fig.suptitle(f"Codes flagged dead, K = {codebook_size}")
    fig.tight_layout()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4,
               frameon=False)
    return fig

# ------------------------------------------------------------------------------------- the claims


def parity_claims(parity: pd.DataFrame) -> dict:
    """From `buggy_equals_none`: upstream == none (max |difference| exactly 0) and upstream == encodec 0.1.1
    (torch.equal) at every step, and the largest upstream-vs-none difference."""
    up_none = parity[parity.comparison == "upstream vs none"]
    return {"buggy_equals_none": bool((up_none.max_abs_diff == 0).all()),
            "buggy_vs_none_max_abs_diff": float(up_none.max_abs_diff.max()),
            "encodec_parity": bool(parity[parity.comparison == "upstream vs encodec"].equal.all())}


def dead_claims(dead: pd.DataFrame, frames: int, large_frames: int) -> dict:
    """From `dead_code_arithmetic`: the fewest codes flagged dead at `frames` per step by the absolute threshold
    (and its floor) and by the relative one, and the absolute floor at `large_frames`."""
    at_n = dead[dead.frames == frames]
    absolute = at_n[at_n.rule == "absolute"]
    return {"min_dead_codes_at_threshold_2": int(absolute.dead.min()), "dead_floor": int(absolute.floor.iloc[0]),
            "min_dead_codes_relative_0.1": int(at_n[at_n.rule == "relative"].dead.min()),
            "dead_floor_at_large_frames": int(dead[(dead.frames == large_frames)
                                                   & (dead.rule == "absolute")].floor.max())}


def ddp_claims(ddp: pd.DataFrame) -> dict:
    """From `rank0_broadcast`: per mode the largest |rank 0 - rank 1| over steps and buffers, and the codes
    `fixed` replaced on rank 0."""
    return {"ddp_max_rank_diff": {mode: float(rows.max_abs_diff.max()) for mode, rows in ddp.groupby("mode")},
            "ddp_fixed_replaced": int(ddp[(ddp["mode"] == "fixed") & (ddp.buffer == "embed")].replaced_rank0.sum())}


def summary(knobs: dict, writes: ExpiryWrites, parity: dict, shrink: KMeansShrink, dead: dict, ddp: dict) -> dict:
    """01_bug_anatomy's summary.json: the knobs and every claim of the five experiments."""
    return {
        "knobs": knobs,
        "replaced_upstream": writes.replaced_upstream,
        "replaced_rows_surviving_upstream": writes.replaced_rows_surviving_upstream,
        "identical_to_no_write_twin": writes.identical_to_twin,
        "replaced_fixed": writes.replaced_fixed,
        "fixed_replaced_are_frames": writes.fixed_replaced_are_frames,
        "fixed_alive_next_step": writes.fixed_alive_next_step,
        "buggy_equals_none": parity["buggy_equals_none"],
        "buggy_vs_none_max_abs_diff": parity["buggy_vs_none_max_abs_diff"],
        "encodec_parity": parity["encodec_parity"],
        "kmeans_shrink_median_ratio": shrink.median_ratio,
        "kmeans_shrink_median_ratio_over_theory": shrink.median_ratio_over_theory,
        "kmeans_empty_codes": shrink.empty_codes,
        **{k: dead[k] for k in ("min_dead_codes_at_threshold_2", "dead_floor", "min_dead_codes_relative_0.1",
                                "dead_floor_at_large_frames")},
        "ddp_max_rank_diff": ddp["ddp_max_rank_diff"],
    }


if __name__ == "__main__":
    _ddp_worker(sys.argv[1:])
