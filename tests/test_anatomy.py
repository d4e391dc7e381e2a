"""The bug at unit level (studylib.analysis.anatomy), at small sizes: each experiment shows what it claims."""

from __future__ import annotations

import sys

import pytest

from studylib.analysis import anatomy

pytest.importorskip("encodec")

SMALL = {"n": 100, "codebook_size": 128, "dim": 16, "seed": 0, "kmeans_iters": 5}  # n < K: codes die at once


def test_encodec_replacements_vanish_and_fixed_ones_survive():
    result = anatomy.expiry_writes_vanish(steps=6, **SMALL)
    enc = result.table[result.table["mode"] == "encodec"]
    assert result.replaced_upstream > 0 and (enc.replaced > 0).all(), "the test must exercise expiries"
    # right after expire_codes_ every replaced row is a batch frame; after forward none is (encodec#61)
    assert (enc.frames_after_expiry == enc.replaced).all()
    assert result.replaced_rows_surviving_upstream == 0 and (enc.frames_after_step == 0).all()
    assert result.identical_to_twin and enc.identical_to_twin.all()

    fix = result.table[result.table["mode"] == "fixed"]
    assert result.replaced_fixed > 0
    assert result.fixed_replaced_are_frames and (fix.frames_after_step == fix.replaced).all()
    assert result.fixed_alive_next_step
    checked = fix.dropna(subset=["alive_next_step"])
    assert (checked.alive_next_step == checked.replaced).all() and checked.replaced.sum() > 0


def test_buggy_expiry_equals_none_and_upstream_is_encodec_every_step():
    steps = 15
    table = anatomy.buggy_equals_none(steps=steps, **SMALL)
    assert sorted(table.step.unique()) == list(range(steps))
    for comparison in ("upstream vs none", "upstream vs encodec"):
        rows = table[table.comparison == comparison]
        assert set(anatomy.BUFFERS) <= set(rows.buffer)
        assert (rows.max_abs_diff == 0).all() and rows.equal.all(), comparison
    assert "rng_state" in set(table[table.comparison == "upstream vs encodec"].buffer)
    per_step = table.groupby("step").upstream_replaced.first()
    assert (per_step > 0).all(), "upstream replaced codes on every step, to no effect"


def test_kmeans_init_shrinks_encodec_codes_as_predicted_and_init_fix_does_not():
    result = anatomy.kmeans_shrink(n=1600, codebook_size=64, dim=16, seed=0, kmeans_iters=5)
    hit = result.table[result.table["count"] >= 2]
    enc, fix = hit[hit["mode"] == "encodec"], hit[hit["mode"] == "init_fix"]
    assert len(enc) > 20
    assert result.median_ratio_over_theory["encodec"] == pytest.approx(1.0, abs=0.05)
    assert result.median_ratio["encodec"] < 0.2  # counts ~25: (0.99 + 0.25) / 25 ~ 0.05
    assert (enc.ratio < 0.6).all()  # c >= 2: at most (0.99 + 0.02) / 2 plus noise
    assert result.median_ratio["init_fix"] == pytest.approx(1.0, abs=0.01)
    assert (fix.theory - 1).abs().max() < 1e-3


def test_dead_codes_never_below_the_arithmetic_floor():
    table = anatomy.dead_code_arithmetic(steps=8, large_n=400, **SMALL)
    absolute = table[table.rule == "absolute"]
    small = absolute[absolute.frames == 100]
    assert (small.floor == 128 - 100 // 2).all() and (small.dead >= small.floor).all()
    assert (small.implementation == "encodec").all()
    assert small.usage_sum.to_numpy() == pytest.approx(100, rel=1e-4)
    assert (absolute[absolute.frames == 400].floor == 0).all()  # 400 frames can keep 200 >= 128 codes alive
    assert (table[table.rule == "relative"].floor == 0).all()


def test_encodec_regime_flags_at_least_724_codes_every_step():
    table = anatomy.dead_code_arithmetic(n=600, codebook_size=1024, dim=128, steps=4, kmeans_iters=1,
                                         large_n=None)
    absolute = table[table.rule == "absolute"]
    assert len(absolute) == 4 and (absolute.floor == 724).all() and (absolute.dead >= 724).all()


def test_rank0_broadcast_fixed_stays_in_sync_and_encodec_modes_drift(tmp_path):
    table = anatomy.rank0_broadcast(steps=5, work_dir=tmp_path, **SMALL)
    assert {p.name for p in tmp_path.glob("rank*.parquet")} == {"rank0.parquet", "rank1.parquet"}
    assert len(table) == 3 * 5 * len(anatomy.BUFFERS)
    by_mode = {mode: rows for mode, rows in table.groupby("mode")}
    fixed = by_mode["fixed"]
    assert (fixed.max_abs_diff == 0).all()
    assert fixed.replaced_rank0.sum() > 0 and (fixed.replaced_rank0 == fixed.replaced_rank1).all()
    for mode in ("upstream", "none"):
        stats = by_mode[mode][by_mode[mode].buffer != "inited"]
        assert (stats.max_abs_diff > 0).any(), mode
    assert by_mode["upstream"].replaced_rank0.sum() > 0


def test_rank0_broadcast_refuses_a_regime_where_encodec_could_deadlock():
    with pytest.raises(ValueError, match="deadlock"):
        anatomy.rank0_broadcast(n=300, codebook_size=128, dim=8, steps=1)


def test_frames_are_deterministic_and_streams_differ():
    a, b = anatomy.frames(3, 50, 8, seed=1), anatomy.frames(3, 50, 8, seed=1)
    assert a.equal(b) and not a.equal(anatomy.frames(3, 50, 8, seed=1, stream=1))


def test_missing_encodec_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "encodec.quantization", None)
    with pytest.raises(ImportError, match=r"pip install encodec==0\.1\.1"):
        anatomy.expiry_writes_vanish(steps=1, **SMALL)


def test_kmeans_shrink_refuses_beyond_four_budgets_and_says_that_limit():
    assert anatomy.KMEANS_SHRINK_LIMIT == 4 * anatomy.KMEANS_BUDGET
    n = int(anatomy.KMEANS_SHRINK_LIMIT // (256 * 128)) + 1  # one frame over the limit
    with pytest.raises(ValueError, match=r"allowed at most 3\.2e\+08 \(4 x KMEANS_BUDGET"):
        anatomy.kmeans_shrink(n=n, codebook_size=256, dim=128)


def test_the_claims_read_off_the_experiment_tables():
    import pandas as pd

    parity = pd.DataFrame({"comparison": ["upstream vs none"] * 2 + ["upstream vs encodec"] * 2,
                           "max_abs_diff": [0.0, 0.0, 0.0, 0.0], "equal": [True, True, True, False]})
    assert anatomy.parity_claims(parity) == {"buggy_equals_none": True, "buggy_vs_none_max_abs_diff": 0.0,
                                             "encodec_parity": False}
    dead = pd.DataFrame({"frames": [600, 600, 600, 600, 4800], "rule": ["absolute", "absolute", "relative", "relative",
                                                                        "absolute"],
                         "dead": [730, 724, 20, 10, 0], "floor": [724, 724, 0, 0, 0]})
    assert anatomy.dead_claims(dead, 600, 4800) == {"min_dead_codes_at_threshold_2": 724, "dead_floor": 724,
                                                    "min_dead_codes_relative_0.1": 10, "dead_floor_at_large_frames": 0}
    ddp = pd.DataFrame({"mode": ["fixed", "fixed", "none"], "buffer": ["embed", "embed_avg", "embed"],
                        "max_abs_diff": [0.0, 0.0, 2.5], "replaced_rank0": [3, 100, 0]})
    assert anatomy.ddp_claims(ddp) == {"ddp_max_rank_diff": {"fixed": 0.0, "none": 2.5}, "ddp_fixed_replaced": 3}


def test_plot_dead_codes_has_a_panel_per_batch_size_with_its_floor():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    dead = pd.DataFrame([{"frames": n, "rule": rule, "step": step, "dead": 10, "floor": 7 if n == 16 else 0,
                          "implementation": "encodec" if n == 16 else "ours"}
                         for n in (16, 64) for rule in ("absolute", "relative") for step in (0, 1)])
    fig = anatomy.plot_dead_codes(dead, 32, {"absolute": "red", "relative": "green"})
    assert len(fig.axes) == 2 and fig.axes[0].get_title().startswith("n = 16 frames per step, floor 7")
