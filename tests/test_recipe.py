"""The recipe study's functions (studylib.analysis.recipe): signal trace, curves, plateau, targets, run tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from studylib.analysis import recipe
from studylib.model.codec import Codec, CodecConfig


def test_signal_trace_shows_pytorch_init_losing_the_input():
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(6, 1, 4800, generator=g) * torch.rand(6, 1, 1, generator=g)
    traces = {}
    for init in ("pytorch", "unit_gain"):
        torch.manual_seed(0)
        traces[init] = recipe.signal_trace(Codec(CodecConfig(**{**CodecConfig.tiny().__dict__, "init": init})), wav)
    for trace in traces.values():
        assert list(trace.position) == list(range(len(trace))) and set(trace.part) == {"encoder", "decoder"}
        assert (trace.spread <= trace["std"] * 1.01).all()  # a spread across inputs never exceeds the total
    latent = {init: t[t.part == "encoder"].iloc[-1] for init, t in traces.items()}
    assert latent["unit_gain"].spread / latent["unit_gain"]["std"] > 0.5
    assert latent["pytorch"].spread / latent["pytorch"]["std"] < 0.05


def metrics_frame(si_sdr: list[float]) -> pd.DataFrame:
    rows = [{"step": 50 * (i + 1), "split": "valid", "seconds": 30.0 * (i + 1), "si_sdr": s, "mel_distance": 4 - i / 10,
             "perplexity_l0": 10.0 * (i + 1)} for i, s in enumerate(si_sdr)]
    return pd.DataFrame(rows + [{"step": 10, "split": "train", "seconds": 5.0, "loss": 1.0}])


def test_curves_and_the_step_a_run_leaves_the_plateau():
    curve = recipe.curves(metrics_frame([-46.0, -45.0, -12.0, 2.0]))
    assert list(curve.step) == [50, 100, 150, 200] and list(curve.minutes) == [0.5, 1.0, 1.5, 2.0]
    assert recipe.left_plateau(curve) == 150
    assert recipe.left_plateau(recipe.curves(metrics_frame([-46.0, -45.5]))) is None


def test_targets_are_strict_where_the_issue_says_above():
    scores = pd.DataFrame({"si_sdr_db": [0.0, 0.1, 3.0], "perplexity_l0": [64.0, 64.0, 63.9],
                           "mel_distance": [4.0, 4.0, 3.0]})
    verdict = recipe.targets(scores)
    assert verdict.si_sdr_db_ok.tolist() == [False, True, True]
    assert verdict.perplexity_l0_ok.tolist() == [True, True, False]
    assert verdict.mel_distance_ok.tolist() == [True, True, True]
    assert verdict.meets_targets.tolist() == [False, True, False]


def fake_run(folder: Path, seed: int, si_sdr: list[float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"seed": seed, "threads": 1, "config": {"steps": 200}}))
    metrics_frame(si_sdr).to_parquet(folder / "metrics.parquet")
    pd.DataFrame({"item": [0, 1, 0, 1], "bandwidth": [6.0, 6.0, 3.0, 3.0], "si_sdr": [1.0, 3.0, -1.0, 0.0],
                  "mel_distance": [3.0, 4.0, 5.0, 5.0]}).to_parquet(folder / "eval_test.parquet")
    pd.DataFrame({"bandwidth": [6.0, 6.0, 3.0], "level": [0, 1, 0], "perplexity": [80.0, 90.0, 70.0],
                  "usage": [0.2, 0.4, 0.1]}).to_parquet(folder / "eval_test_levels.parquet")
    return folder


def test_run_tables(tmp_path):
    runs = {"a": fake_run(tmp_path / "a", 0, [-46.0, -20.0, 1.0, 2.0]), "b": fake_run(tmp_path / "b", 0, [-46.0] * 4)}
    scores = recipe.test_scores(runs["a"], 6.0)
    assert scores == pytest.approx({"si_sdr_db": 2.0, "mel_distance": 3.5, "perplexity_l0": 80.0, "usage_mean": 0.3})
    curve = pd.concat([recipe.run_curve(d, name) for name, d in runs.items()], ignore_index=True)
    table = recipe.variant_table({"a": {"change": "x"}, "b": {"change": "y"}}, runs, curve, 6.0).set_index("variant")
    assert table.loc["a", "left_plateau"] == 100 and pd.isna(table.loc["b", "left_plateau"])
    assert table.loc["a", "test_si_sdr_db"] == 2.0 and table.loc["a", "valid_si_sdr_db"] == 2.0
    chosen = recipe.chosen_scores([runs["a"], tmp_path / "missing"], 6.0)
    assert chosen.run.tolist() == ["a"] and chosen.steps.tolist() == [200]
