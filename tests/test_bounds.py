"""Issue 36: bounds checked before a run spends memory or writes anything, each one line naming the key and the
limit; nothing is left behind (no run folder, no `.lock`)."""

from __future__ import annotations

import pytest
from conftest import SMOKE, one_line, train_cli

from studylib.core import config as cfglib
from studylib.core.config import UserError
from studylib.training import bounds
from studylib.training.run_config import TrainConfig


def config(**sets) -> TrainConfig:
    return cfglib.build(TrainConfig, [cfglib.read_overlay(SMOKE), {"device": "cpu", **sets}])


@pytest.mark.parametrize("sets, key", [({"n_q": 100_000}, "n_q"), ({"batch_size": 100_000_000}, "batch_size")])
def test_a_step_that_would_not_fit_names_the_key_the_estimate_and_what_is_available(sets, key):
    with pytest.raises(UserError, match=rf"^{key}: .* needs about [\d.]+ GB by studylib's estimate .* this machine "
                                        rf"has 2\.0 GB available; lower {key}$"):
        bounds.check_fits(config(**sets), available=2 << 30)


def test_the_estimate_counts_the_codecs_weights_exactly_without_building_every_level():
    from studylib.model.codec import Codec

    cfg = config(n_q=4)
    codec = Codec(cfg.codec_config())
    weights = sum(p.numel() for p in codec.parameters())
    buffers = sum(b.numel() for b in codec.buffers())
    assert bounds.step_memory(cfg).state == 4 * (4 * weights + buffers)
    assert bounds.check_fits(cfg) is not None  # the smoke run fits here


@pytest.mark.parametrize("sets, fragments", [
    (["n_q=100000"], ["n_q: 100000", "GB by studylib's estimate", "lower n_q"]),
    (["seed=-1"], ["seed: got -1, allowed an integer >= 0"]),
    (["init_from=/nonexistent/run"], ["init_from: /nonexistent/run does not exist"]),
])
def test_train_refuses_before_writing_anything(tmp_path, synthetic_manifest, sets, fragments):
    run_dir = tmp_path / "run"
    proc = train_cli(SMOKE, sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}", *sets])
    one_line(proc, 2, "train", *fragments)
    assert not run_dir.exists()  # no folder, so no .lock and no failed run left behind


def test_like_a_folder_that_is_not_there_is_one_line(tmp_path):
    proc = train_cli(SMOKE, "--like", str(tmp_path / "nothing"), sets=[f"run_dir={tmp_path / 'new'}"])
    one_line(proc, 2, "train", "--like:", "is not a run folder")
