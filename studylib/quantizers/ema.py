"""Residual vector quantization with EnCodec's EMA codebook and every dead-code expiry variant.

One codebook, three expiry modes (`ExpiryConfig.mode`):

* ``upstream`` -- EnCodec 0.1.1 bit for bit, bug included: the replacement is written to ``embed`` and
  then thrown away by the EMA update (https://github.com/facebookresearch/encodec/issues/61).
* ``none``     -- no expiry at all. With per-codebook generators it is bit-identical to ``upstream``.
* ``fixed``    -- a replacement that survives the EMA (``embed``, ``cluster_size`` and ``embed_avg`` all
  reset), checked after the EMA every ``every`` steps against an absolute or a relative threshold,
  statistics SUM-all-reduced across ranks, replacement frames identical on every rank, and k-means
  initialisation that stores means x counts in ``embed_avg``.

Arithmetic. ``upstream`` and ``none`` reproduce EnCodec's floating-point results exactly (its distance
expression; its one-hot cluster sums and k-means scores through `studylib.quantizers.exact`, which gets the same bits
without EnCodec's cost), so their parity with the ``encodec`` package is ``torch.equal``. ``fixed`` uses the
cheap equivalents (``addmm`` distances, ``bincount``/``index_add_`` statistics). The k-means is shared by
all modes.

Reading order: `ExpiryConfig`, `kmeans`, `EuclideanCodebook` (`forward`, then `_update`: the three modes
are its three branches), `VectorQuantization`, `ResidualVectorQuantizer`.

The persistent buffers are exactly EnCodec's (``inited``, ``cluster_size``, ``embed``, ``embed_avg``) and
the module tree mirrors ``encodec.quantization.ResidualVectorQuantizer``, so EnCodec state dicts load
with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from studylib.core import distributed
from studylib.quantizers.base import LevelSchedule, QuantizedResult, codebook_metrics, ema_, nominal_kbps
from studylib.quantizers.exact import encodec_cluster_sums, nearest_among_distinct, nearest_codes

MODES = ("none", "upstream", "fixed")
THRESHOLD_KINDS = ("absolute", "relative")
COUNTERS = ("steps", "checks", "replaced_last", "replaced_total")  # non-persistent per-codebook diagnostics


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ExpiryConfig:
    """How (and whether) dead codes are replaced.

    threshold: a code is dead when its EMA usage ``cluster_size`` is below it. ``absolute``: in frames
        (EnCodec's ``threshold_ema_dead_code``, default 2). ``relative``: a fraction of the usage a code
        gets under uniform use, ``cluster_size.sum() / codebook_size``, so it does not depend on the
        number of frames per step (Moshi uses 0.1). In ``none`` mode it only defines the reported
        "dead codes" metric.
    every: check for dead codes every N training steps (``fixed`` only; EnCodec checks every step).
    replaced_usage: the usage a replaced code starts with, in the threshold's units; None means the
        uniform share ``cluster_size.sum() / codebook_size`` (Moshi's choice).
    sync: aggregate statistics across torch.distributed ranks (``fixed`` only; ``upstream`` always does
        what EnCodec does: broadcast every buffer from rank 0 after init and after each expiry).
    """

    mode: str = "upstream"
    threshold: float = 2.0
    threshold_kind: str = "absolute"
    every: int = 1
    replaced_usage: float | None = None
    sync: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: got {self.mode!r}, allowed {MODES}")
        if not _is_number(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold: got {self.threshold!r}, allowed a finite number >= 0")
        if self.threshold_kind not in THRESHOLD_KINDS:
            raise ValueError(f"threshold_kind: got {self.threshold_kind!r}, allowed {THRESHOLD_KINDS}")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"every: got {self.every!r}, allowed an integer >= 1")
        if self.replaced_usage is not None and (
            not _is_number(self.replaced_usage) or self.replaced_usage <= 0
        ):
            raise ValueError(f"replaced_usage: got {self.replaced_usage!r}, allowed None or a number > 0")
        if not isinstance(self.sync, bool):
            raise ValueError(f"sync: got {self.sync!r}, allowed True or False")
        if self.mode == "upstream" and self.threshold_kind != "absolute":
            raise ValueError("threshold_kind: upstream mode allows only 'absolute' (EnCodec's threshold)")
        if self.mode == "upstream" and self.every != 1:
            raise ValueError("every: upstream mode allows only 1 (EnCodec expires on every step)")


# ----------------------------------------------------------------------------------------- sampling


def sample_indices(
    n: int, num: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`num` indices into n rows: without replacement when n >= num, else with (EnCodec's draws).

    With no generator the draws are EnCodec's exactly (global RNG, on `device`); with one, they are
    made on the generator's device and moved to `device`.
    """
    draw_on = device if generator is None else generator.device
    if n >= num:
        idx = torch.randperm(n, generator=generator, device=draw_on)[:num]
    else:
        idx = torch.randint(0, n, (num,), generator=generator, device=draw_on)
    return idx.to(device)


def sample_vectors(samples: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`num` rows of `samples` [n, d] drawn as `sample_indices` draws them."""
    return samples[sample_indices(samples.shape[0], num, samples.device, generator)]


# ------------------------------------------------------------------------------------------ k-means


class NonFiniteError(FloatingPointError):
    """NaN or Inf where the codebook needs finite data."""


@dataclass
class KMeansResult:
    means: torch.Tensor  # [c, d]
    counts: torch.Tensor  # [c] int64, cluster sizes of the last assignment (as EnCodec returns them)


def kmeans(
    samples: torch.Tensor, num_clusters: int, num_iters: int, generator: torch.Generator | None = None
) -> KMeansResult:
    """Lloyd's k-means exactly as EnCodec runs it (same seeding draws, same assignments, empty clusters
    keep their previous mean), without the n x c x d tensor."""
    if num_iters < 1:
        raise ValueError(f"kmeans_iters: got {num_iters}, allowed an integer >= 1 when kmeans_init")
    if not torch.isfinite(samples).all():
        raise NonFiniteError("k-means init: the frames to cluster hold NaN or Inf")
    means = sample_vectors(samples, num_clusters, generator)
    counts = torch.zeros(num_clusters, dtype=torch.long, device=samples.device)
    uniq_s, sample_of = torch.unique(samples, dim=0, return_inverse=True)  # frames are fixed: dedup once
    for _ in range(num_iters):
        buckets = nearest_among_distinct(uniq_s, means)[sample_of]
        counts = torch.bincount(buckets, minlength=num_clusters)
        empty = counts == 0
        sums = means.new_zeros(means.shape).index_add_(0, buckets, samples)
        means = torch.where(empty[:, None], means, sums / counts.masked_fill(empty, 1)[:, None])
    return KMeansResult(means, counts)


# ----------------------------------------------------------------------------------------- codebook


class EuclideanCodebook(nn.Module):
    """EnCodec's EMA codebook with a configurable dead-code expiry.

    forward(x [..., d]) -> (quantize [..., d], embed_ind [...]); in training mode it also updates the
    codebook. `generator`, when given, drives every random draw of this codebook (uniform init, k-means
    seeding, replacement sampling); None uses the global RNG exactly as EnCodec does.
    `init_fix`: store means x counts (not means) in `embed_avg` after k-means; None means "on in
    `fixed` mode only".
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 50,
        expiry: ExpiryConfig | None = None,
        init_fix: bool | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}, allowed an integer >= 1")
        if not (_is_number(decay) and 0 < decay < 1):
            raise ValueError(f"decay: got {decay!r}, allowed a number in (0, 1)")
        if not (_is_number(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon: got {epsilon!r}, allowed a number > 0")
        if kmeans_init and (not isinstance(kmeans_iters, int) or kmeans_iters < 1):
            raise ValueError(f"kmeans_iters: got {kmeans_iters!r}, allowed an integer >= 1 when kmeans_init")
        self.expiry = expiry if expiry is not None else ExpiryConfig()
        self.dim, self.codebook_size = dim, codebook_size
        self.decay, self.epsilon = float(decay), float(epsilon)
        self.kmeans_iters = kmeans_iters
        self.init_fix = (self.expiry.mode == "fixed") if init_fix is None else bool(init_fix)
        self.generator = generator
        # upstream/none reproduce EnCodec's float operations bit for bit; fixed takes the fast ones.
        self.reference_arithmetic = self.expiry.mode != "fixed"

        if kmeans_init:
            embed = torch.zeros(codebook_size, dim)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(codebook_size, dim), generator=generator)
        self.register_buffer("inited", torch.Tensor([not kmeans_init]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        # Diagnostics: not in the state dict, so EnCodec checkpoints load strictly.
        for name in COUNTERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long), persistent=False)

    # -- lookup ----------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code of each row of x [n, d] -> [n]."""
        embed_t = self.embed.t()  # [d, K]
        sq_e = embed_t.pow(2).sum(0, keepdim=True)  # [1, K]
        if self.reference_arithmetic:
            # EnCodec: -(|x|^2 - 2 x.e + |e|^2).max(-1); same roundings in the same order, in place.
            # Scaling an operand by -2 scales every partial sum exactly, so x @ (-2 e) == -2 (x @ e).
            m2e_t = (-2 * self.embed).t()
            return nearest_codes(x, lambda rows: (rows @ m2e_t).add_(rows.pow(2).sum(1, keepdim=True)).add_(sq_e),
                                 self.codebook_size, f"encodec K={self.codebook_size}")
        return nearest_codes(x, lambda rows: torch.addmm(sq_e, rows, embed_t, alpha=-2.0),
                             self.codebook_size, f"addmm K={self.codebook_size}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x.reshape(-1, self.dim)).view(x.shape[:-1])

    def decode(self, embed_ind: torch.Tensor) -> torch.Tensor:
        return F.embedding(embed_ind, self.embed)

    def dead_mask(self) -> torch.Tensor:
        """Codes whose EMA usage is below the configured threshold -> bool [K]."""
        threshold = self.expiry.threshold
        if self.expiry.threshold_kind == "relative":
            threshold = threshold * self.cluster_size.sum() / self.codebook_size
        return self.cluster_size < threshold

    # -- training --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # [n, d]
        if not self.inited:
            self._init_embed(flat.detach())
        embed_ind = self.quantize(flat)
        # The output uses the codebook as it was before this step's update (as EnCodec).
        quantize = F.embedding(embed_ind, self.embed).view(shape)
        if self.training:
            with torch.no_grad():
                self._update(flat.detach(), embed_ind)
        return quantize, embed_ind.view(shape[:-1])

    @torch.no_grad()
    def _init_embed(self, x: torch.Tensor) -> None:
        sync = self.expiry.mode == "fixed" and self.expiry.sync
        data = distributed.all_gather_rows(x) if sync else x  # k-means on every rank's frames
        result = kmeans(data, self.codebook_size, self.kmeans_iters, self.generator)
        self.embed.copy_(result.means)
        counts = result.counts.to(self.cluster_size.dtype)
        # EnCodec stores the means; the EMA then treats them as sums, so a code with count c shrinks by
        # about (0.99 + 0.01 c) / c on the first step. init_fix stores means x counts (Moshi, lucidrains).
        self.embed_avg.copy_(result.means * counts[:, None] if self.init_fix else result.means)
        self.cluster_size.copy_(counts)
        self.inited.fill_(True)
        distributed.broadcast_(self._state())

    def _state(self) -> list[torch.Tensor]:
        return [self.inited, self.cluster_size, self.embed, self.embed_avg]

    def _refresh_embed(self) -> None:
        # Laplace-smoothed counts keep empty clusters finite: embed = embed_avg / smoothed count.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))

    def _update(self, x: torch.Tensor, embed_ind: torch.Tensor) -> None:
        """One training step's codebook update: the expiry where its mode puts it, and the EMA."""
        self.steps += 1
        if x.shape[0] == 0:
            return
        if self.expiry.mode == "upstream":
            # THE BUG (https://github.com/facebookresearch/encodec/issues/61): EnCodec expires *before* the EMA
            # and writes only `embed`, which `_refresh_embed` below rebuilds from statistics it never touched.
            self._expire_upstream(x)
        counts, sums = self._statistics(x, embed_ind)
        ema_(self.cluster_size, counts, self.decay)
        ema_(self.embed_avg, sums, self.decay)
        self._refresh_embed()
        if self.expiry.mode == "fixed" and self.expiry.threshold > 0 and int(self.steps) % self.expiry.every == 0:
            # THE FIX (#61): expire *after* the EMA and reset embed, cluster_size and embed_avg together.
            self._expire_fixed(x)
        # mode "none": no expiry at all (the threshold only defines the reported "dead codes")

    def _statistics(self, x: torch.Tensor, embed_ind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's per-code counts [K] and frame sums [K, d]: EnCodec's bits in `none` / `upstream`
        (studylib.quantizers.exact), scatter-adds SUM-all-reduced across ranks in `fixed` (every rank, same EMA)."""
        if self.reference_arithmetic:
            counts = torch.bincount(embed_ind, minlength=self.codebook_size).to(x.dtype)
            return counts, encodec_cluster_sums(x, embed_ind, self.codebook_size)
        stats = x.new_zeros(self.codebook_size, self.dim + 1)  # [K, d sums | count]
        stats[:, : self.dim].index_add_(0, embed_ind, x)
        stats[:, self.dim] = torch.bincount(embed_ind, minlength=self.codebook_size).to(x.dtype)
        if self.expiry.sync:
            distributed.all_reduce_sum_(stats)
        return stats[:, self.dim], stats[:, : self.dim]

    def _expire_upstream(self, x: torch.Tensor) -> None:
        """EnCodec's `expire_codes_`: compares the pre-EMA usage, always draws K samples."""
        if self.expiry.threshold == 0:
            return
        self.checks += 1
        expired = self.cluster_size < self.expiry.threshold
        if not torch.any(expired):
            self.replaced_last.zero_()
            return
        idx = sample_indices(x.shape[0], self.codebook_size, x.device, self.generator)  # always K draws
        self.replaced_last.copy_(expired.sum())
        self.replaced_total += self.replaced_last
        # THE BUG (https://github.com/facebookresearch/encodec/issues/61): only `embed` is written, and the
        # EMA update right after this call rebuilds `embed` from embed_avg / cluster_size, which were not
        # touched. With a single process the expiry's only lasting effect is the RNG it consumed.
        self.embed[expired] = x[idx[expired]].to(self.embed.dtype)
        distributed.broadcast_(self._state())  # rank 0's buffers win on every rank

    def _expire_fixed(self, x: torch.Tensor) -> None:
        """Replace dead codes by batch frames so that the replacement survives the next EMA step."""
        self.checks += 1
        dead = self.dead_mask()
        idx = dead.nonzero().squeeze(1)
        n_dead = idx.numel()  # identical on every rank when the statistics are synchronised
        self.replaced_last.fill_(n_dead)
        self.replaced_total += n_dead
        if n_dead == 0:
            return
        frames = self._replacement_frames(x, n_dead)  # [n_dead, d]
        total = self.cluster_size.sum()
        if self.expiry.replaced_usage is None:
            usage = total / self.codebook_size
        elif self.expiry.threshold_kind == "relative":
            usage = self.expiry.replaced_usage * total / self.codebook_size
        else:
            usage = torch.tensor(self.expiry.replaced_usage, device=x.device)
        self.embed[idx] = frames
        self.cluster_size[idx] = usage.to(self.cluster_size.dtype)
        self.embed_avg[idx] = frames * usage

    def _replacement_frames(self, x: torch.Tensor, num: int) -> torch.Tensor:
        if not (self.expiry.sync and distributed.is_distributed()):
            return sample_vectors(x, num, self.generator)
        # Each rank draws its share; the gathered frames, taken round-robin across ranks, are the same
        # everywhere, so the codebooks stay identical.
        share = -(-num // distributed.world_size())
        gathered = distributed.all_gather_rows(sample_vectors(x, share, self.generator))  # [W * share, d]
        world = distributed.world_size()
        return gathered.view(world, share, self.dim).transpose(0, 1).reshape(-1, self.dim)[:num]


# ------------------------------------------------------------------------------------ one RVQ level


class VectorQuantization(nn.Module):
    """One RVQ level: codebook lookup, straight-through estimator and commitment loss (EnCodec's)."""

    def __init__(self, codebook: EuclideanCodebook, commitment_weight: float = 1.0):
        super().__init__()
        # `_codebook` and the (identity) projections keep EnCodec's state-dict keys.
        self.project_in = nn.Identity()
        self.project_out = nn.Identity()
        self._codebook = codebook
        self.commitment_weight = commitment_weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._codebook.encode(x.transpose(1, 2))  # [B, D, T] -> [B, T]

    def decode(self, embed_ind: torch.Tensor) -> torch.Tensor:
        return self._codebook.decode(embed_ind).transpose(1, 2)  # [B, T] -> [B, D, T]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.transpose(1, 2)  # [B, T, D]
        quantize, embed_ind = self._codebook(x)
        loss = torch.tensor([0.0], device=x.device, requires_grad=self.training)
        if self.training:
            quantize = x + (quantize - x).detach()  # straight-through
            if self.commitment_weight > 0:
                loss = loss + F.mse_loss(quantize.detach(), x) * self.commitment_weight
        return quantize.transpose(1, 2), embed_ind, loss


# ------------------------------------------------------------------------------------ residual VQ


class ResidualVectorQuantizer(LevelSchedule, nn.Module):
    """EnCodec's residual VQ over our codebook; EnCodec state dicts load into it strictly.

    `detach_residual` is the fix for https://github.com/facebookresearch/encodec/issues/25 as AudioCraft
    applies it (off = EnCodec: commitment gradients of levels > 1 cancel). `quantizer_dropout` draws the
    number of levels uniformly in [1, n_q] per training batch (SoundStream). `generator` seeds one
    generator per level, so the levels' draws do not interleave (needed for upstream == none).
    """

    def __init__(
        self,
        dimension: int = 128,
        n_q: int = 32,
        bins: int = 1024,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 50,
        expiry: ExpiryConfig | None = None,
        quantizer_dropout: bool = False,
        detach_residual: bool = False,
        generator: torch.Generator | None = None,
        epsilon: float = 1e-5,
        init_fix: bool | None = None,
    ):
        super().__init__()
        if not isinstance(n_q, int) or n_q < 1:
            raise ValueError(f"n_q: got {n_q!r}, allowed an integer >= 1")
        self.dimension, self.n_q, self.bins = dimension, n_q, bins
        self.expiry = expiry if expiry is not None else ExpiryConfig()
        self.quantizer_dropout, self.detach_residual = quantizer_dropout, detach_residual
        self.generator = generator
        level_generators: list[torch.Generator | None] = [None] * n_q
        if generator is not None:
            seeds = torch.randint(0, 2**62, (n_q,), generator=generator, device=generator.device)
            level_generators = [torch.Generator(generator.device).manual_seed(int(s)) for s in seeds]
        codebooks = [
            EuclideanCodebook(dimension, bins, decay, epsilon, kmeans_init, kmeans_iters, self.expiry,
                              init_fix, g)
            for g in level_generators
        ]
        # EnCodec's module tree: quantizer.vq.layers.{i}._codebook.*
        self.vq = nn.Module()
        self.vq.layers = nn.ModuleList(VectorQuantization(cb) for cb in codebooks)

    @property
    def codebooks(self) -> list[EuclideanCodebook]:
        return [layer._codebook for layer in self.vq.layers]

    def resume_state(self) -> dict:
        """What a checkpoint needs beyond state_dict() to resume bit-exactly: expiry counters and every
        generator's state (kept out of the state dict so EnCodec checkpoints load strictly)."""
        gens = [self.generator] + [cb.generator for cb in self.codebooks]
        return {
            "counters": [{n: getattr(cb, n).clone() for n in COUNTERS} for cb in self.codebooks],
            "generators": [g.get_state() if g is not None else None for g in gens],
        }

    def load_resume_state(self, state: dict) -> None:
        for cb, counters in zip(self.codebooks, state["counters"], strict=True):
            for name, value in counters.items():
                getattr(cb, name).copy_(value)
        gens = [self.generator] + [cb.generator for cb in self.codebooks]
        for g, g_state in zip(gens, state["generators"], strict=True):
            if g is not None:
                g.set_state(g_state)

    def forward(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> QuantizedResult:
        n_q = self.levels_for_step(frame_rate, bandwidth)
        replaced_before = [cb.replaced_total.clone() for cb in self.codebooks[:n_q]] if self.training else []

        quantized_out = torch.zeros_like(x) if self.detach_residual else 0.0
        residual = x
        codes, losses = [], []
        for layer in self.vq.layers[:n_q]:
            quantized, indices, loss = layer(residual)
            if self.detach_residual:
                quantized = quantized.detach()
            residual = residual - quantized
            quantized_out = quantized_out + quantized
            codes.append(indices)
            losses.append(loss)
        if self.training and self.detach_residual:
            quantized_out = x + (quantized_out - x).detach()

        codes_t = torch.stack(codes)
        metrics = codebook_metrics(self.codebooks, codes_t, self.bins, replaced_before) if self.training else {}
        bw = torch.tensor(nominal_kbps(n_q, self.bins, frame_rate)).to(x)
        return QuantizedResult(quantized_out, codes_t, bw, penalty=torch.mean(torch.stack(losses)),
                               metrics=metrics)

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor) -> None:
        """k-means-initialise every level not yet initialised on the frames x [N, D], level by level on the
        residual of the levels before (as training's first forward would, but on as many frames as given:
        the first batch alone, 600 frames, cannot give K = 1024 distinct means)."""
        residual = x
        for cb in self.codebooks:
            if not cb.inited:
                cb._init_embed(residual)
            residual = residual - cb.decode(cb.quantize(residual))

    def encode(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> torch.Tensor:
        """x [B, D, T] -> codes [n_q, B, T]."""
        residual, codes = x, []
        for layer in self.vq.layers[: self.get_num_quantizers_for_bandwidth(frame_rate, bandwidth)]:
            indices = layer.encode(residual)
            residual = residual - layer.decode(indices)
            codes.append(indices)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n_q, B, T] -> quantized [B, D, T]."""
        out = torch.tensor(0.0, device=codes.device)
        for layer, indices in zip(self.vq.layers, codes):
            out = out + layer.decode(indices)
        return out
