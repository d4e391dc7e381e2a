"""EnCodec's floating-point results, bit for bit, without EnCodec's cost.

Why this module exists: the study's central control is that our ``upstream`` codebook *is* EnCodec's
(``torch.equal`` at every step against ``encodec==0.1.1``), and ``none`` is then provably the same codebook
minus an expiry that changes nothing. Parity needs EnCodec's roundings, but EnCodec gets them from two
expensive expressions: its k-means scores every frame against every mean through an n x c x d difference
tensor (~130 s for 8 levels x 50 iterations at 600 frames, K = 1024, on 2 cores), and its EMA sums frames
per code with an N x K one-hot matmul. Both results are reproduced here exactly and fast:

* `nearest_upstream_exact`: a matmul ranks the means; only those within a rigorous rounding margin of the
  best are re-scored with EnCodec's own expression, so ties and near-ties resolve exactly as EnCodec's do.
* `nearest_codes`: the lookup's ``addmm(...).argmin()`` in row blocks that stay in cache, where a check per
  shape finds the blocks give the one-call product's bits.
* `encodec_cluster_sums`: a one-hot product only adds rows of x, in the order the BLAS library's blocking
  dictates; that order is identified once per shape (and verified), then scatter-adds in the same order
  give the same bits. Where no order matches (e.g. cuBLAS) the matmul itself is used.

Nothing here decides *what* the codebook does; `studylib.quantizers.ema` reads as the algorithm and calls in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["nearest_upstream_exact", "nearest_among_distinct", "encodec_cluster_sums", "nearest_codes"]


def _matmul_unit_roundoff(device: torch.device) -> float:
    # TF32 / bf16 matmuls (allowed by set_float32_matmul_precision on GPU) round far more coarsely.
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return 2.0**-8
    return 2.0**-24


def nearest_upstream_exact(samples: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """argmax over means of EnCodec's k-means score ``-((s - m) ** 2).sum(-1)``, bit-exact, in O(n c d) matmul.

    EnCodec materialises an n x c x d difference tensor. Here a matmul score ranks the means, and only
    the means within a rigorous rounding margin of the best are re-scored with EnCodec's expression
    (the per-row reduction gives identical bits whatever the layout). Identical frames, and identical
    means where there are many ties, are scored once: they score identically, and residuals of a level
    whose codes fit their frames are mostly exact zeros. Ties go to the lowest index, as EnCodec's max().
    """
    uniq_s, sample_of = torch.unique(samples, dim=0, return_inverse=True)
    return nearest_among_distinct(uniq_s, means)[sample_of]


def _candidate_pairs(uniq_s: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, mean) pairs that rounding could make the exact nearest; rows ascending, then means."""
    d = uniq_s.shape[1]
    # Rank on centred data: distances do not change, but the rounding error of the matmul score scales
    # with |s - c|^2 + |m - c|^2, so latents with a large common offset keep few candidates.
    center = uniq_s.mean(0)
    centred_s, centred_m = uniq_s - center, means - center
    sq_s = centred_s.pow(2).sum(1)  # [n]
    sq_m = centred_m.pow(2).sum(1)  # [c]
    score = torch.addmm(sq_m.neg()[None], centred_s, centred_m.t(), alpha=2.0)  # [n, c] = 2 s.m - |m|^2
    best, best_idx = score.max(dim=1, keepdim=True)
    # The score, the centring and EnCodec's own expression of pair (s, m) are each within a few
    # (d + 2) u (|s - c|^2 + |m - c|^2) of the true value, so mean j can beat the best mean b only if
    # score_j >= score_b - k (2 |s|^2 + |m_j|^2 + |m_b|^2); k = 16 (d + 4) u leaves room to spare. The
    # bound is per pair: one far-away mean must not widen every row's candidate set.
    k = 16 * (d + 4) * _matmul_unit_roundoff(uniq_s.device)
    margin = (sq_m[None, :] + (2 * sq_s[:, None] + sq_m[best_idx])).mul_(k)  # [n, c]
    return (score >= best - margin).nonzero(as_tuple=True)


def nearest_among_distinct(uniq_s: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """`nearest_upstream_exact` for rows that are already distinct (k-means dedups its frames once)."""
    num_means = means.shape[0]
    index = torch.arange(num_means, device=means.device)  # candidate column -> original mean index
    rows, cols = _candidate_pairs(uniq_s, means)
    if rows.numel() > 16 * uniq_s.shape[0]:
        # Many exact ties: duplicate means (seeding with replacement when n < K, empty clusters). Identical
        # means score identically, so keep one of each, standing for its lowest original index.
        means, mean_of = torch.unique(means, dim=0, return_inverse=True)
        index = torch.full((means.shape[0],), num_means, device=means.device).scatter_reduce_(
            0, mean_of, torch.arange(num_means, device=means.device), "amin")
        rows, cols = _candidate_pairs(uniq_s, means)
    exact = -((uniq_s[rows] - means[cols]) ** 2).sum(-1)  # EnCodec's expression, per candidate
    row_max = exact.new_full((uniq_s.shape[0],), -math.inf).scatter_reduce_(0, rows, exact, "amax")
    first = torch.where(exact == row_max[rows], index[cols], num_means)  # ties: the lowest original index
    nearest = torch.full((uniq_s.shape[0],), num_means, dtype=torch.long, device=uniq_s.device)
    return nearest.scatter_reduce_(0, rows, first, "amin")



# ------------------------------------------------------------------------ EnCodec's cluster sums, fast

# Reduction block sizes to try: BLAS libraries sum a matmul's inner dimension sequentially within blocks
# of a fixed size and add the blocks in order. MKL on an AVX2 EPYC uses 192 for EnCodec's shapes, its last block
# short; MKL 2024.2 on an AVX-512 Xeon with AMX (one thread) uses 384 and splits what is left for the last two
# blocks evenly (600 rows: 300 + 300; 4,800: 11 x 384, then 288 + 288), found by probing which rows a large
# value swallows.
_BLOCK_CANDIDATES = (192, 256, 128, 384, 512, 96, 64, 320, 160, 224, 288, 448, 32)
_BLOCKS: dict[tuple, tuple[int, ...] | None] = {}


def _onehot_matmul(x: torch.Tensor, embed_ind: torch.Tensor, num_codes: int) -> torch.Tensor:
    """EnCodec's cluster sums, ``(x.t() @ one_hot(embed_ind)).t()`` -> [K, d]."""
    onehot = x.new_zeros(x.shape[0], num_codes).scatter_(1, embed_ind[:, None], 1.0)
    return (x.t() @ onehot).t()


def _blocked_sums(x: torch.Tensor, embed_ind: torch.Tensor, num_codes: int, layout: tuple[int, ...]) -> torch.Tensor:
    """Per-code sums of x's rows: in row order within each block (`layout`: the blocks' lengths, which add up to
    the rows), blocks added in order."""
    out, start = None, 0
    for length in layout:
        rows = slice(start, start + length)
        part = x.new_zeros(num_codes, x.shape[1]).index_add_(0, embed_ind[rows], x[rows])
        out = part if out is None else out.add_(part)
        start += length
    return out


def _block_candidates(n: int) -> tuple[tuple[int, ...], ...]:
    """The block layouts `_reduction_block` tries for `n` rows, in order: all rows at once, then for each block
    size blocks of that size with a short last one, and the same with the last two sharing what is left evenly."""
    layouts = [(n,)]
    for block in (b for b in _BLOCK_CANDIDATES if b < n):
        full, rest = divmod(n, block)
        layouts.append((block,) * full + ((rest,) if rest else ()))
        if rest:  # the tail block + rest split in two: half and half (the larger half first, then second)
            tail = block + rest
            layouts += [(block,) * (full - 1) + (tail - tail // 2, tail // 2),
                        (block,) * (full - 1) + (tail // 2, tail - tail // 2)]
    return tuple(dict.fromkeys(layouts))


def _reduction_block(n: int, d: int, num_codes: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[int, ...] | None:
    """The block layout with which `_blocked_sums` reproduces the matmul bit for bit on this machine, found
    once per shape on stress data (few codes, so every sum spans many blocks); None if none does."""
    key = (n, d, num_codes, dtype, device, torch.get_num_threads())
    if key not in _BLOCKS:
        g = torch.Generator().manual_seed(n)  # private: the global RNG is not touched
        trials = [(torch.randn(n, d, generator=g).to(device, dtype),
                   torch.randint(0, min(num_codes, 4 + t), (n,), generator=g).to(device)) for t in range(3)]
        expected = [_onehot_matmul(x, i, num_codes) for x, i in trials]
        _BLOCKS[key] = next(
            (layout for layout in _block_candidates(n)
             if all(torch.equal(_blocked_sums(x, i, num_codes, layout), e) for (x, i), e in zip(trials, expected))),
            None,
        )
    return _BLOCKS[key]


def encodec_cluster_sums(x: torch.Tensor, embed_ind: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``(x.t() @ one_hot(embed_ind)).t()`` bit for bit, without the N x K one-hot matmul where possible.

    A one-hot product only ever adds rows of x, in the order the BLAS library's blocking dictates; once
    that order is identified (and verified) for a shape, scatter-adds in the same order give the same
    bits at a fraction of the cost. Elsewhere (e.g. cuBLAS) it falls back to the matmul itself.
    """
    layout = _reduction_block(x.shape[0], x.shape[1], num_codes, x.dtype, x.device)
    if layout is None:
        return _onehot_matmul(x, embed_ind, num_codes)
    return _blocked_sums(x, embed_ind, num_codes, layout)


# ------------------------------------------------------------------------------ the lookup in row blocks

_ROW_BLOCK = 128  # rows of distances per block: 128 x K floats stay in cache between the matmul and the argmin
_BLOCKED_FROM = 1 << 22  # n x K from which blocks pay (benchmarks/bench_nearest.py)
_ROWS_EXACT: dict[tuple, bool] = {}


def _row_blocks_exact(x: torch.Tensor, distances: Callable[[torch.Tensor], torch.Tensor], kind: str) -> bool:
    """Whether `distances` of each row block gives the bits of `distances` of all rows for x's shape and layout
    on this machine (a BLAS library may pick another kernel for a short block); checked once on random rows,
    since the rounding order depends on the shapes, not the values."""
    key = (kind, tuple(x.shape), x.stride(), x.dtype, torch.get_num_threads())  # K is in `kind`
    if key not in _ROWS_EXACT:
        g = torch.Generator().manual_seed(x.shape[0])  # private: the global RNG is not touched
        xs = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).normal_(generator=g)
        full = distances(xs)
        _ROWS_EXACT[key] = all(torch.equal(distances(xs[i: i + _ROW_BLOCK]), full[i: i + _ROW_BLOCK])
                               for i in range(0, x.shape[0], _ROW_BLOCK))
    return _ROWS_EXACT[key]


def nearest_codes(x: torch.Tensor, distances: Callable[[torch.Tensor], torch.Tensor], num_codes: int,
                  kind: str) -> torch.Tensor:
    """``distances(x).argmin(-1)`` -> [n] for rows x [n, d], bit for bit; `distances` maps rows [m, d] to their
    distances to the `num_codes` codes [m, K] row by row (`kind` names the expression for the check).

    At 4,800 frames x K = 16,384 the [n, K] matrix (315 MB) leaves the cache before argmin reads it back; in
    row blocks of `_ROW_BLOCK` it does not (1.6-1.7x on one core, AVX-512 Xeon). Blocks are used on CPU for
    large problems only, and only where `_row_blocks_exact` finds they round as the whole product does.
    """
    n = x.shape[0]
    if x.device.type != "cpu" or n <= _ROW_BLOCK or n * num_codes < _BLOCKED_FROM \
            or not _row_blocks_exact(x, distances, kind):
        return distances(x).argmin(dim=-1)
    out = torch.empty(n, dtype=torch.long)
    for start in range(0, n, _ROW_BLOCK):
        out[start: start + _ROW_BLOCK] = distances(x[start: start + _ROW_BLOCK]).argmin(dim=-1)
    return out
