"""The quantizer the study rests on: parity with encodec 0.1.1, the bug's consequences, the fix, config errors."""

from __future__ import annotations

import pytest
import torch

from studylib.quantizers.ema import EuclideanCodebook, ExpiryConfig, ResidualVectorQuantizer, kmeans
from studylib.quantizers.exact import encodec_cluster_sums, nearest_upstream_exact

encodec_core = pytest.importorskip("encodec.quantization.core_vq")
encodec_vq = pytest.importorskip("encodec.quantization.vq")

BUFFERS = ("inited", "cluster_size", "embed", "embed_avg")


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)


def batch(step: int, n: int, dim: int) -> torch.Tensor:
    """Deterministic frames whose scale changes across steps, so usage shifts and codes die."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, dim, generator=g) * (0.5 + step % 4) + step % 3


def assert_same_buffers(a: torch.nn.Module, b: torch.nn.Module, where: str) -> None:
    for name in BUFFERS:
        assert torch.equal(getattr(a, name), getattr(b, name)), f"{name} differs {where}"


# ------------------------------------------------------------------------------------------- parity


def test_kmeans_is_encodecs_bit_for_bit_and_has_no_nxcxd_tensor():
    for n, c, d in [(600, 128, 16), (40, 64, 8), (1500, 256, 32)]:
        torch.manual_seed(3)
        samples = torch.randn(n, d) * torch.rand(n, 1) * 3
        torch.manual_seed(7)
        means, counts = encodec_core.kmeans(samples, c, 15)
        torch.manual_seed(7)
        ours = kmeans(samples, c, 15)
        assert torch.equal(means, ours.means) and torch.equal(counts, ours.counts), (n, c, d)


def test_exact_nearest_breaks_ties_like_encodec():
    # integer-valued data makes exact ties common; EnCodec's max() returns the first maximal index
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(-2, 3, (500, 4), generator=g).float()
    means = torch.randint(-2, 3, (64, 4), generator=g).float()
    reference = (-((samples[:, None] - means[None]) ** 2).sum(-1)).max(-1).indices
    assert torch.equal(nearest_upstream_exact(samples, means), reference)


@pytest.mark.parametrize(
    "n, size, kmeans_init",
    [(600, 256, True), (100, 256, True), (600, 128, False)],
    ids=["N>=K-kmeans", "N<K-kmeans", "N>=K-uniform-init"],
)
def test_upstream_codebook_matches_encodec_every_step(n, size, kmeans_init):
    torch.manual_seed(0)
    theirs = encodec_core.EuclideanCodebook(32, size, kmeans_init=kmeans_init, kmeans_iters=10,
                                            threshold_ema_dead_code=2)
    torch.manual_seed(0)
    ours = EuclideanCodebook(32, size, kmeans_init=kmeans_init, kmeans_iters=10)
    for step in range(25):
        x = batch(step, n, 32)
        torch.manual_seed(step)
        q_theirs, i_theirs = theirs(x)
        torch.manual_seed(step)
        q_ours, i_ours = ours(x)
        assert torch.equal(q_theirs, q_ours) and torch.equal(i_theirs, i_ours), f"step {step}"
        assert_same_buffers(theirs, ours, f"at step {step}")
    assert int(ours.replaced_total) > 0, "the test must exercise expiries"
    assert torch.equal(theirs.encode(x), ours.encode(x))
    assert torch.equal(theirs.decode(i_theirs), ours.decode(i_ours))


def test_upstream_codebook_matches_encodec_from_loaded_state():
    torch.manual_seed(1)
    donor = encodec_core.EuclideanCodebook(16, 128, kmeans_init=True, kmeans_iters=5)
    for step in range(3):
        donor(batch(step, 300, 16))
    theirs = encodec_core.EuclideanCodebook(16, 128, kmeans_init=True, kmeans_iters=5)
    ours = EuclideanCodebook(16, 128, kmeans_iters=5)
    theirs.load_state_dict(donor.state_dict())
    ours.load_state_dict(donor.state_dict(), strict=True)
    for step in range(20):
        x = batch(50 + step, 300 if step % 2 else 90, 16)  # alternate N >= K and N < K
        torch.manual_seed(step)
        out_theirs = theirs(x)
        torch.manual_seed(step)
        out_ours = ours(x)
        assert all(torch.equal(a, b) for a, b in zip(out_theirs, out_ours)), f"step {step}"
        assert_same_buffers(theirs, ours, f"at step {step}")
    assert int(ours.checks) == 20 and int(ours.replaced_total) > 0


def test_upstream_rvq_matches_encodec_every_step():
    torch.manual_seed(0)
    theirs = encodec_vq.ResidualVectorQuantizer(dimension=32, n_q=4, bins=128, kmeans_iters=5)
    torch.manual_seed(0)
    ours = ResidualVectorQuantizer(dimension=32, n_q=4, bins=128, kmeans_iters=5)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    for step in range(20):
        x = batch(step, 2 * 32 * 50, 1).view(2, 32, 50).requires_grad_(True)
        bandwidth = (1.5, 3.0, None)[step % 3]
        torch.manual_seed(step)
        r_theirs = theirs(x, 75, bandwidth)
        torch.manual_seed(step)
        r_ours = ours(x, 75, bandwidth)
        for name in ("quantized", "codes", "bandwidth", "penalty"):
            assert torch.equal(getattr(r_theirs, name), getattr(r_ours, name)), f"{name}, step {step}"
        for cb_theirs, cb_ours in zip(theirs.vq.layers, ours.vq.layers):
            assert_same_buffers(cb_theirs._codebook, cb_ours._codebook, f"at step {step}")
    # gradients reach the input identically
    g_theirs = torch.autograd.grad(r_theirs.quantized.sum() + r_theirs.penalty, x)[0]
    g_ours = torch.autograd.grad(r_ours.quantized.sum() + r_ours.penalty, x)[0]
    assert torch.equal(g_theirs, g_ours)
    theirs.eval(), ours.eval()
    codes = theirs.encode(x, 75, 3.0)
    assert torch.equal(codes, ours.encode(x, 75, 3.0))
    assert torch.equal(theirs.decode(codes), ours.decode(codes))


def test_encodec_state_dict_loads_strictly():
    theirs = encodec_vq.ResidualVectorQuantizer(dimension=128, n_q=8, bins=1024)
    ours = ResidualVectorQuantizer(dimension=128, n_q=8, bins=1024, expiry=ExpiryConfig(mode="fixed"))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {
        k: v.dtype for k, v in theirs.state_dict().items()
    }


@pytest.mark.parametrize("bandwidth, n_q", [(1.5, 2), (3.0, 4), (6.0, 8), (12.0, 16), (24.0, 32),
                                            (None, 32), (0.1, 1), (7.0, 9)])
def test_bandwidth_to_levels_as_encodec(bandwidth, n_q):
    theirs = encodec_vq.ResidualVectorQuantizer(dimension=8, n_q=32, bins=1024)
    ours = ResidualVectorQuantizer(dimension=8, n_q=32, bins=1024)
    assert ours.get_num_quantizers_for_bandwidth(75, bandwidth) == n_q
    assert theirs.get_num_quantizers_for_bandwidth(75, bandwidth) == n_q
    assert ours.get_bandwidth_per_quantizer(75) == pytest.approx(0.75)


# ---------------------------------------------------------------------------- the bug's consequence


def test_buggy_expiry_is_bit_identical_to_no_expiry():
    """The study's first headline: with per-codebook generators, `upstream` == `none` after many steps."""
    models = {
        mode: ResidualVectorQuantizer(dimension=16, n_q=3, bins=256, kmeans_iters=5,
                                      expiry=ExpiryConfig(mode=mode), generator=torch.Generator().manual_seed(5))
        for mode in ("upstream", "none")
    }
    for step in range(60):
        x = batch(step, 16 * 200, 1).view(2, 16, 100)
        outs = {mode: model(x, 75) for mode, model in models.items()}
        assert torch.equal(outs["upstream"].codes, outs["none"].codes), f"step {step}"
    up, none = models["upstream"].state_dict(), models["none"].state_dict()
    assert all(torch.equal(up[k], none[k]) for k in up)
    replaced = sum(int(cb.replaced_total) for cb in models["upstream"].codebooks)
    assert replaced > 1000, "upstream did write replacements, to no effect"
    assert sum(int(cb.replaced_total) for cb in models["none"].codebooks) == 0


def test_kmeans_init_stores_means_upstream_and_sums_when_fixed():
    x = batch(0, 600, 8)
    up = EuclideanCodebook(8, 64, kmeans_iters=5, generator=torch.Generator().manual_seed(0))
    fixed = EuclideanCodebook(8, 64, kmeans_iters=5, expiry=ExpiryConfig(mode="fixed", threshold=0.0),
                              generator=torch.Generator().manual_seed(0))
    up._init_embed(x), fixed._init_embed(x)
    assert torch.equal(up.embed, fixed.embed)
    assert torch.equal(up.embed_avg, up.embed)  # EnCodec's defect: means, not sums
    torch.testing.assert_close(fixed.embed_avg, fixed.embed * fixed.cluster_size[:, None])
    # After one EMA step EnCodec's codes shrink by about (0.99 + 0.01 c) / c; fixed ones stay put.
    up.train()(x), fixed.train()(x)
    busy = fixed.cluster_size > 20
    assert (up.embed[busy].norm(dim=1) < 0.2 * fixed.embed[busy].norm(dim=1)).all()


# --------------------------------------------------------------------------------------- the fix


def test_fixed_replacements_are_batch_frames_and_survive_the_next_ema_step():
    cb = EuclideanCodebook(8, 128, kmeans_iters=5, generator=torch.Generator().manual_seed(0),
                           expiry=ExpiryConfig(mode="fixed", threshold=0.5, threshold_kind="relative"))
    cb.train()
    for step in range(30):
        x = batch(step, 256, 8)
        cb(x)
        if int(cb.replaced_last) > 0:
            break
    else:
        pytest.fail("no code was ever replaced")
    # the replaced codes are exactly frames of this step's batch (an EMA average never is)
    is_frame = (cb.embed[:, None, :] == x[None, :, :]).all(-1).any(1)
    replaced_idx = is_frame.nonzero().squeeze(1)
    assert replaced_idx.numel() == int(cb.replaced_last)
    usage = cb.cluster_size[replaced_idx]
    assert (usage == usage[0]).all() and not cb.dead_mask()[replaced_idx].any()
    torch.testing.assert_close(cb.embed_avg[replaced_idx], cb.embed[replaced_idx] * usage[:, None])
    snapshot = cb.embed[replaced_idx].clone()
    _, used = cb(torch.randn(256, 8) * 100 + 1000)  # a batch far away: (almost) no code is used
    assert not cb.dead_mask()[replaced_idx].any(), "replaced codes must still be alive after one EMA step"
    unused = ~torch.isin(replaced_idx, used)
    assert unused.sum() >= replaced_idx.numel() - 2
    torch.testing.assert_close(cb.embed[replaced_idx][unused], snapshot[unused], rtol=1e-4, atol=1e-4)


def codebook_far_from_data(mode: str) -> EuclideanCodebook:
    expiry = ExpiryConfig(mode=mode, threshold=0.1, threshold_kind="relative") if mode == "fixed" else \
        ExpiryConfig(mode=mode, threshold=2.0)
    cb = EuclideanCodebook(8, 64, kmeans_init=False, expiry=expiry, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cb.embed.add_(50.0)  # every code far from the data
        cb.embed_avg.copy_(cb.embed * 8)
        cb.cluster_size.fill_(8.0)
    return cb.train()


@pytest.mark.parametrize("mode", ["upstream", "fixed"])
def test_codebook_started_far_from_data(mode):
    cb = codebook_far_from_data(mode)
    for step in range(400):
        cb(torch.randn(512, 8, generator=torch.Generator().manual_seed(step)))
    eval_codes = cb.encode(torch.randn(4096, 8, generator=torch.Generator().manual_seed(9999)))
    used = torch.bincount(eval_codes, minlength=64).gt(0).sum()
    dead = int(cb.dead_mask().sum())
    if mode == "fixed":
        assert dead == 0 and used == 64
    else:
        assert dead >= 60 and used <= 4, "upstream's expiry cannot rescue codes far from the data"


def test_encodec_regime_flags_at_least_724_codes_every_step():
    """600 frames per step vs K = 1024 at threshold 2: at most 300 codes can have usage >= 2."""
    torch.manual_seed(0)
    rvq = {mode: ResidualVectorQuantizer(dimension=128, n_q=1, bins=1024, kmeans_iters=2,
                                         expiry=ExpiryConfig(mode=mode, threshold=2.0, replaced_usage=2.0)
                                         if mode == "fixed" else ExpiryConfig(mode=mode))
           for mode in ("upstream", "fixed")}
    for step in range(12):
        x = torch.randn(8, 128, 75, generator=torch.Generator().manual_seed(step))
        for mode, model in rvq.items():
            metrics = model(x, 75).metrics
            assert int(metrics["dead_l0"]) >= 724 or mode == "fixed", (mode, step)
            assert int(metrics["replaced_l0"]) >= 724 or (mode == "upstream" and step == 0), (mode, step)
    assert float(rvq["upstream"].codebooks[0].cluster_size.sum()) == pytest.approx(600, rel=1e-3)


def test_fixed_checks_every_n_steps_only():
    cb = EuclideanCodebook(8, 64, kmeans_iters=2, generator=torch.Generator().manual_seed(0),
                           expiry=ExpiryConfig(mode="fixed", threshold=0.5, threshold_kind="relative", every=5))
    cb.train()
    for step in range(23):
        cb(batch(step, 64, 8))
    assert int(cb.steps) == 23 and int(cb.checks) == 4


def test_empty_clusters_stay_finite():
    cb = EuclideanCodebook(4, 256, kmeans_iters=3, expiry=ExpiryConfig(mode="fixed", threshold=0.0),
                           generator=torch.Generator().manual_seed(0))
    cb.train()
    for step in range(50):
        cb(torch.full((8, 4), float(step % 2)))  # two distinct frames: almost every cluster stays empty
    for name in BUFFERS:
        assert torch.isfinite(getattr(cb, name)).all(), name
    assert int((cb.cluster_size > 1e-3).sum()) <= 2


def test_generator_makes_codebook_draws_independent_of_global_rng():
    def run(global_seed: int) -> dict:
        torch.manual_seed(global_seed)
        model = ResidualVectorQuantizer(dimension=8, n_q=2, bins=64, kmeans_iters=3,
                                        expiry=ExpiryConfig(mode="fixed", threshold=1.0),
                                        generator=torch.Generator().manual_seed(11))
        for step in range(10):
            model(batch(step, 8 * 40, 1).view(1, 8, 40), 75)
        return model.state_dict()

    a, b = run(0), run(123)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_detach_residual_lets_later_levels_commitment_reach_the_input():
    x = torch.randn(1, 8, 200, requires_grad=True)
    grads = {}
    for detach in (False, True):
        rvq = ResidualVectorQuantizer(dimension=8, n_q=3, bins=16, kmeans_iters=2, detach_residual=detach,
                                      generator=torch.Generator().manual_seed(0))
        rvq(x, 75)  # init
        out = rvq(x, 75)
        (grads[detach],) = torch.autograd.grad(out.penalty, x)
    single = ResidualVectorQuantizer(dimension=8, n_q=1, bins=16, kmeans_iters=2,
                                     generator=torch.Generator().manual_seed(0))
    single(x, 75)
    (first_level_only,) = torch.autograd.grad(single(x, 75).penalty * (1 / 3), x)
    # encodec issue #25: without the detach, only level 1's commitment term reaches the input
    torch.testing.assert_close(grads[False], first_level_only)
    assert not torch.allclose(grads[True], first_level_only)


def test_metrics_per_level():
    rvq = ResidualVectorQuantizer(dimension=8, n_q=2, bins=32, kmeans_iters=2,
                                  generator=torch.Generator().manual_seed(0))
    out = rvq(torch.randn(2, 8, 100), 75)
    assert set(out.metrics) == {f"{m}_l{lvl}" for m in ("used", "perplexity", "dead", "replaced") for lvl in (0, 1)}
    for lvl in (0, 1):
        used = int(out.metrics[f"used_l{lvl}"])
        assert used == out.codes[lvl].unique().numel()
        assert 1.0 <= float(out.metrics[f"perplexity_l{lvl}"]) <= used + 1e-4
    assert rvq.eval()(torch.randn(2, 8, 10), 75).metrics == {}


def test_quantizer_dropout_draws_levels_in_training_only():
    rvq = ResidualVectorQuantizer(dimension=8, n_q=8, bins=16, kmeans_iters=2, quantizer_dropout=True,
                                  generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 8, 50)
    levels = {rvq(x, 75).codes.shape[0] for _ in range(40)}
    assert len(levels) > 3 and levels <= set(range(1, 9))
    assert rvq.eval()(x, 75).codes.shape[0] == 8


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "bogus"}, "mode"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "2"}, "threshold"),
        ({"threshold_kind": "percent"}, "threshold_kind"),
        ({"mode": "fixed", "every": 0}, "every"),
        ({"mode": "fixed", "every": 2.5}, "every"),
        ({"replaced_usage": 0.0}, "replaced_usage"),
        ({"sync": "yes"}, "sync"),
        ({"mode": "upstream", "threshold_kind": "relative"}, "threshold_kind"),
        ({"mode": "upstream", "every": 5}, "every"),
    ],
)
def test_bad_expiry_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ExpiryConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"decay": 1.0}, "decay"), ({"epsilon": 0.0}, "epsilon"), ({"kmeans_iters": 0}, "kmeans_iters"),
     ({"codebook_size": 0}, "codebook_size")],
)
def test_bad_codebook_args_name_the_field(kwargs, field):
    args = {"dim": 4, "codebook_size": 8} | kwargs
    with pytest.raises(ValueError, match=rf"^{field}: "):
        EuclideanCodebook(**args)


def test_resume_state_continues_bit_exactly():
    def make():
        return ResidualVectorQuantizer(dimension=8, n_q=2, bins=64, kmeans_iters=2, quantizer_dropout=True,
                                       expiry=ExpiryConfig(mode="fixed", threshold=1.0, every=2),
                                       generator=torch.Generator().manual_seed(3))

    straight = make()
    for step in range(12):
        straight(batch(step, 8 * 30, 1).view(1, 8, 30), 75)
    first = make()
    for step in range(5):
        first(batch(step, 8 * 30, 1).view(1, 8, 30), 75)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    resumed.load_resume_state(first.resume_state())
    for step in range(5, 12):
        resumed(batch(step, 8 * 30, 1).view(1, 8, 30), 75)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [int(cb.replaced_total) for cb in straight.codebooks] == [int(cb.replaced_total) for cb in resumed.codebooks]


def test_kmeans_exact_on_latents_with_a_large_common_offset():
    """Real encoder latents sit far from the origin and vary little: centring keeps the candidates few."""
    g = torch.Generator().manual_seed(0)
    samples = 40.0 + 0.3 * torch.randn(600, 32, generator=g)
    torch.manual_seed(1)
    means, counts = encodec_core.kmeans(samples, 128, 5)
    torch.manual_seed(1)
    ours = kmeans(samples, 128, 5)
    assert torch.equal(means, ours.means) and torch.equal(counts, ours.counts)


def test_kmeans_on_non_finite_data_says_so():
    from studylib.quantizers.ema import NonFiniteError

    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        kmeans(torch.full((10, 4), float("nan")), 4, 2)


@pytest.mark.parametrize("n, d, k", [(600, 128, 1024), (4800, 128, 1024), (100, 32, 256), (1000, 16, 64)])
def test_cluster_sums_are_encodecs_onehot_matmul_bit_for_bit(n, d, k):
    g = torch.Generator().manual_seed(n)
    for codes_used in (k, 3):  # spread out, and a few long sums crossing every block boundary
        x = torch.randn(n, d, generator=g) * 3
        ind = torch.randint(0, codes_used, (n,), generator=g)
        onehot = torch.nn.functional.one_hot(ind, k).float()
        assert torch.equal(encodec_cluster_sums(x, ind, k), (x.t() @ onehot).t())


def test_cluster_sums_fall_back_to_the_matmul_when_no_block_order_matches(monkeypatch):
    from studylib.quantizers import exact as q

    # no order to try: which orders a BLAS library uses depends on the machine (MKL on an AMX Xeon halves 600 rows,
    # which the earlier form of this test, trying the sequential order only, took for "no order matches")
    monkeypatch.setattr(q, "_block_candidates", lambda n: ())
    monkeypatch.setattr(q, "_BLOCKS", {})
    x, ind = torch.randn(600, 128), torch.randint(0, 7, (600,))
    assert q._reduction_block(600, 128, 1024, x.dtype, x.device) is None
    onehot = torch.nn.functional.one_hot(ind, 1024).float()
    assert torch.equal(q.encodec_cluster_sums(x, ind, 1024), (x.t() @ onehot).t())


def test_kmeans_exact_with_outliers_and_duplicate_frames():
    """Silence (identical frames) and a far outlier: exact ties everywhere and one huge mean."""
    g = torch.Generator().manual_seed(0)
    samples = torch.cat([torch.randn(400, 16, generator=g), torch.zeros(150, 16), torch.full((2, 16), 1e3)])
    samples = samples[torch.randperm(len(samples), generator=g)]
    for seed in range(3):
        torch.manual_seed(seed)
        means, counts = encodec_core.kmeans(samples, 256, 5)
        torch.manual_seed(seed)
        ours = kmeans(samples, 256, 5)
        assert torch.equal(means, ours.means) and torch.equal(counts, ours.counts)


def test_init_codebooks_runs_kmeans_level_by_level_on_all_frames():
    from studylib.quantizers.ema import ResidualVectorQuantizer

    rvq = ResidualVectorQuantizer(dimension=8, n_q=3, bins=64, kmeans_iters=5,
                                  generator=torch.Generator().manual_seed(0))
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    rvq.init_codebooks(x)
    for cb in rvq.codebooks:
        assert bool(cb.inited) and float(cb.cluster_size.sum()) == 500  # k-means counts of all 500 frames
    # deeper levels were fitted to the residual of the levels before, not to x
    residual = x - rvq.codebooks[0].decode(rvq.codebooks[0].quantize(x))
    assert float(residual.norm()) < float(x.norm())
    embed1 = rvq.codebooks[1].embed.clone()
    rvq.init_codebooks(x * 10)  # initialised levels are left alone
    assert torch.equal(rvq.codebooks[1].embed, embed1)


@pytest.mark.parametrize("mode", ["none", "fixed"])
@pytest.mark.parametrize("n, k", [(4800, 1024), (1100, 4096), (300, 16384)])
def test_lookup_in_row_blocks_gives_the_one_call_codes(mode, n, k):
    """The lookup computes large distance matrices in row blocks (studylib.quantizers.exact.nearest_codes); the codes
    must
    be those of the whole [n, K] expression, EnCodec's for `none` (the parity with encodec rests on it)."""
    from studylib.quantizers import exact

    assert n * k >= exact._BLOCKED_FROM  # the shapes do take the blocked path
    g = torch.Generator().manual_seed(k)
    book = EuclideanCodebook(128, k, kmeans_init=False, expiry=ExpiryConfig(mode=mode))
    book.embed.copy_(torch.randn(k, 128, generator=g))
    x = torch.randn(n, 128, generator=g) * 2 + 0.5
    x[7] = book.embed[3]  # an exact hit, and a row tied between two equal codes
    book.embed[11] = book.embed[10]
    x[200] = book.embed[10]
    embed_t = book.embed.t()
    sq_e = embed_t.pow(2).sum(0, keepdim=True)
    if mode == "none":
        expected = (x @ (-2 * book.embed).t()).add_(x.pow(2).sum(1, keepdim=True)).add_(sq_e).argmin(dim=-1)
    else:
        expected = torch.addmm(sq_e, x, embed_t, alpha=-2.0).argmin(dim=-1)
    codes = book.quantize(x)
    assert torch.equal(codes, expected)
    assert codes[200] == 10


def test_lookup_keeps_the_whole_matrix_where_blocks_would_round_differently(monkeypatch):
    from studylib.quantizers import exact

    monkeypatch.setattr(exact, "_ROWS_EXACT", {})
    calls = []

    def distances(rows):  # a row's distances depend on how many rows come with it: blocks must be refused
        calls.append(rows.shape[0])
        return rows @ torch.ones(rows.shape[1], 64) + rows.shape[0]

    x = torch.randn(100_000, 4)
    assert x.shape[0] * 64 >= exact._BLOCKED_FROM
    codes = exact.nearest_codes(x, distances, 64, "row-count dependent")
    assert not exact._ROWS_EXACT[("row-count dependent", (100_000, 4), (4, 1), torch.float32, torch.get_num_threads())]
    assert calls[-1] == 100_000  # the answer came from the whole matrix
    assert torch.equal(codes, distances(x).argmin(dim=-1))
