"""The quantizer-only fast path: latents of a run's encoder, RVQ variants trained alone on them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ROOT

from studylib.__main__ import main
from studylib.core import config as cfglib
from studylib.training.latents import LatentRunConfig, Latents, dump_latents, train_on_latents
from studylib.training.run_folder import load_checkpoint


@pytest.fixture(scope="module")
def latents(smoke_run) -> Latents:
    return Latents.load(dump_latents(smoke_run, progress=False))


def test_latents_are_the_encoder_output_of_every_segment(smoke_run, latents, synthetic_manifest):
    from studylib.training.manifest import load_manifest

    codec, cfg, _ = load_checkpoint(smoke_run)
    rows = load_manifest(synthetic_manifest)
    for split in ("train", "valid", "test"):
        frames, offsets = latents.frames[split], latents.offsets[split]
        assert frames.shape[1] == cfg.codec_config().dimension
        assert len(offsets) == (rows.split == split).sum() + 1 and offsets[-1] == len(frames)
        expected = sum(-(-round(s * 24_000) // codec.config.hop_length) for s in rows.seconds[rows.split == split])
        assert len(frames) == expected
    assert latents.frame_rate == 75


def test_cli_writes_latents_and_rejects_a_missing_checkpoint(smoke_run, tmp_path, capsys):
    assert main(["latents", str(smoke_run), "--out", str(tmp_path / "l.pt")]) == 0
    assert "train" in capsys.readouterr().out and (tmp_path / "l.pt").is_file()
    assert main(["latents", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_rvq_alone_on_latents_logs_usage_and_snr(latents):
    cfg = cfglib.build(LatentRunConfig, [{"n_q": 2, "bins": 64, "frames_per_step": 150, "steps": 40,
                                          "kmeans_iters": 5, "log_every": 10, "eval_every": 20,
                                          "expiry_mode": "fixed", "expiry_threshold": 0.5,
                                          "expiry_threshold_kind": "relative"}])
    metrics, rvq = train_on_latents(cfg, latents.frames["train"], latents.frames["valid"], progress=False)
    train_rows, eval_rows = metrics[metrics.split == "train"], metrics[metrics.split == "eval"]
    assert list(train_rows.step) == [10, 20, 30, 40] and list(eval_rows.step) == [20, 40]
    assert (train_rows.used_l0 > 1).all() and (train_rows.used_l0 <= 64).all()
    snr = eval_rows[["snr_l0", "snr_l1"]].iloc[-1]
    assert snr.snr_l1 > snr.snr_l0 > 0, "each level must reduce the residual"
    again, _ = train_on_latents(cfg, latents.frames["train"], latents.frames["valid"], progress=False)
    assert again.equals(metrics), "same config and seed, same metrics"
    assert torch.isfinite(rvq.codebooks[0].embed).all()


def test_latent_run_config_errors_name_the_field():
    with pytest.raises(cfglib.ConfigError, match="^frames_per_step: got 100, allowed a multiple of crop_frames"):
        cfglib.build(LatentRunConfig, [{"frames_per_step": 100}])
    with pytest.raises(cfglib.ConfigError, match="^expiry_threshold_kind: "):
        cfglib.build(LatentRunConfig, [{"expiry_threshold_kind": "percent", "expiry_mode": "fixed"}])


GRID = [{"arm": ["none", "upstream"]}, {"arm": "fixed_rel", "expiry_threshold": [0.1, 0.3], "expiry_every": [1, 5]},
        {"arm": "upstream", "frames_per_step": 150, "seeds": [7]}]
BASE = {"n_q": 2, "bins": 64, "steps": 12, "kmeans_iters": 3, "log_every": 4, "eval_every": 6, "seeds": [0, 1],
        "crop_frames": 75, "frames_per_step": 75}


def test_grid_crosses_lists_and_seeds_and_names_cells_by_arm_hash_seed():
    from studylib.training.latents import expand_grid

    cells = expand_grid(GRID, ROOT / "params" / "arms", BASE)
    assert len(cells) == 2 * 2 + 4 * 2 + 1
    assert len({c.name for c in cells}) == len(cells)
    rel = [c for c in cells if c.arm == "fixed_rel"]
    assert {(c.config.expiry_threshold, c.config.expiry_every) for c in rel} == {(0.1, 1), (0.1, 5), (0.3, 1), (0.3, 5)}
    assert all(c.config.expiry_threshold_kind == "relative" and c.config.init_fix for c in rel)  # from the arm file
    odd = [c for c in cells if c.config.frames_per_step == 150]
    assert len(odd) == 1 and odd[0].config.seed == 7 and odd[0].name.endswith("-s7")
    assert cells[0].variant == "none" and rel[0].variant == "fixed_rel th=0.1 every=1"


def test_training_order_is_cheapest_first_with_a_seeds_arms_together():
    from studylib.training.latents import cell_cost, expand_grid, training_order

    grid = [{"arm": ["none", "fixed_rel"], "bins": [256, 64], "frames_per_step": [150, 75]}]
    cells = expand_grid(grid, ROOT / "params" / "arms", BASE)  # arm-major: none s0, none s1, ... fixed_rel ...
    order = training_order(cells)
    assert sorted(c.name for c in order) == sorted(c.name for c in cells)
    costs = [cell_cost(c) for c in order]
    assert costs == sorted(costs)
    for cost in set(costs):  # within one cost: seed 0's none and fixed_rel, then seed 1's
        same = [(c.config.seed, c.arm) for c in order if cell_cost(c) == cost]
        assert [seed for seed, _ in same] == sorted(seed for seed, _ in same)
        assert {arm for seed, arm in same if seed == 0} == {"none", "fixed_rel"}


@pytest.mark.parametrize("grid, message", [
    ([{"expiry_every": [1]}], "quantizer grid block 0: expected a mapping with an 'arm' key"),
    ([{"arm": "nope"}], "quantizer grid block 0: arm 'nope' unknown; allowed"),
    ([{"arm": "vqtorch"}], "arm 'vqtorch' is not our RVQ"),
    ([{"arm": "fixed_rel", "expiry_every": [0]}], "expiry_every: got 0, allowed an integer >= 1"),
    ([{"arm": "none", "stepz": 3}], "stepz: unknown key; allowed keys:"),
])
def test_grid_errors_name_the_block_or_the_key(grid, message):
    from studylib.training.latents import expand_grid

    with pytest.raises(cfglib.ConfigError, match=message):
        expand_grid(grid, ROOT / "params" / "arms", BASE)


def test_run_grid_writes_one_file_per_cell_and_resumes(latents, tmp_path):
    from studylib.training.latents import expand_grid, run_grid

    cells = expand_grid(GRID[:1], ROOT / "params" / "arms", BASE)
    table = run_grid(cells, latents, tmp_path, progress=False)
    files = sorted((tmp_path / "runs").glob("*.parquet"))
    assert [f.stem for f in files] == sorted(c.name for c in cells)
    assert set(table.cell) == {c.name for c in cells} and {"usage_l0", "perplexity_l1", "snr_l1"} <= set(table)
    eval_rows = table[table.split == "eval"]
    assert eval_rows.usage_l0.between(0, 1).all() and (eval_rows.usage_l0 > 0).all()
    # upstream and none: the same numbers but for the replacements counted
    up, no = (table[(table.arm == a) & (table.seed == 0)].reset_index(drop=True) for a in ("upstream", "none"))
    same = [c for c in table.columns if c.startswith(("usage", "snr", "perplexity", "used"))]
    assert up[same].equals(no[same]) and up.filter(like="replaced_total").max().max() > 0
    stamp = files[0].stat().st_mtime_ns
    again = run_grid(cells, latents, tmp_path, progress=False)
    assert files[0].stat().st_mtime_ns == stamp and again.equals(table)


def test_latent_snr_is_measured_against_the_variance_not_a_constant_offset(latents):
    from studylib.training.latents import latent_eval

    cfg = cfglib.build(LatentRunConfig, [{"n_q": 2, "bins": 64, "frames_per_step": 150, "steps": 5,
                                          "kmeans_iters": 3, "expiry_mode": "none"}])
    _, rvq = train_on_latents(cfg, latents.frames["train"], progress=False)
    x = latents.frames["valid"][:500]
    found = latent_eval(rvq.eval(), x, 75.0)
    recon = rvq.decode(rvq.encode(x.t()[None], 75.0)[:1])[0].t()
    expected = 10 * torch.log10((x - x.mean(0)).square().sum() / (x - recon).square().sum())
    assert found["snr_l0"] == pytest.approx(float(expected), abs=1e-3)
    for cb in rvq.codebooks[:1]:  # shift data and level-0 codes alike: same codes, same error, same SNR
        cb.embed += 5.0
    shifted = latent_eval(rvq, x + 5.0, 75.0)  # plain |x|^2 would count the offset as signal
    assert shifted["snr_l0"] == pytest.approx(found["snr_l0"], abs=1e-2)
    assert 0 <= found["usage_l0"] <= 1 and found["perplexity_l0"] >= 1


def test_an_interrupted_quantizer_run_resumes_from_its_state_to_the_same_numbers(latents, tmp_path, monkeypatch):
    from studylib.quantizers.ema import ResidualVectorQuantizer

    cfg = cfglib.build(LatentRunConfig, [{"n_q": 2, "bins": 64, "frames_per_step": 150, "steps": 40,
                                          "kmeans_iters": 5, "log_every": 5, "eval_every": 10,
                                          "expiry_mode": "fixed", "expiry_threshold": 0.5,
                                          "expiry_threshold_kind": "relative"}])
    args = (cfg, latents.frames["train"], latents.frames["valid"])
    straight, straight_rvq = train_on_latents(*args, progress=False)
    state = tmp_path / "cell.state.pt"
    forward, calls = ResidualVectorQuantizer.forward, []

    def stopping(self, *a, **k):  # Ctrl-C at step 27, after the state of step 20 was saved
        calls.append(1)
        if len(calls) == 27:
            raise KeyboardInterrupt
        return forward(self, *a, **k)

    monkeypatch.setattr(ResidualVectorQuantizer, "forward", stopping)
    with pytest.raises(KeyboardInterrupt):
        train_on_latents(*args, progress=False, state=state, save_every=10)
    monkeypatch.setattr(ResidualVectorQuantizer, "forward", forward)
    assert state.is_file()
    resumed, resumed_rvq = train_on_latents(*args, progress=False, state=state, save_every=10)
    assert resumed.equals(straight), "the resumed run must log what the uninterrupted one logged"
    assert all(torch.equal(a, b) for a, b in zip(resumed_rvq.state_dict().values(),
                                                 straight_rvq.state_dict().values()))
    other = dataclasses.replace(cfg, seed=1)
    fresh, _ = train_on_latents(other, *args[1:], progress=False, state=state)
    assert fresh.step.iloc[0] == 5, "a state written by another config is not resumed"


def test_a_grid_run_in_two_worker_processes_writes_what_one_process_writes(latents, tmp_path):
    from studylib.training.latents import expand_grid, run_grid

    cells = expand_grid(GRID[:1], ROOT / "params" / "arms", BASE)
    threads = torch.get_num_threads()
    serial = run_grid(cells, latents, tmp_path / "one", progress=False)
    assert torch.get_num_threads() == threads, "training cells in this process leaves its thread count alone"
    parallel = run_grid(cells, latents, tmp_path / "two", progress=False, jobs=2)
    assert parallel.equals(serial)
    assert not list((tmp_path / "two" / "runs").glob("*.state.pt")), "finished cells leave no state behind"


def test_a_finished_grid_needs_no_latents_and_a_missing_source_checkpoint_says_how_to_get_one(smoke_run, latents,
                                                                                              tmp_path):
    """A fresh checkout has the cells' files but no checkpoint (they stay out of git): a report on a finished grid
    must not need the latents, and a grid with cells left must say why it cannot go on and how to get them back."""
    import shutil

    from studylib.training.latents import expand_grid, run_grid, run_latents, unfinished

    cells = expand_grid(GRID[:1], ROOT / "params" / "arms", BASE)
    assert unfinished(cells, tmp_path) == cells
    run_grid(cells[:1], latents, tmp_path, progress=False)
    assert unfinished(cells, tmp_path) == cells[1:]
    (tmp_path / "runs" / f"{cells[0].name}.parquet").write_bytes(b"cut short")  # a damaged file is not finished
    assert unfinished(cells, tmp_path) == cells

    checkout = tmp_path / "checkout_run"
    checkout.mkdir()
    for name in ("manifest.json", "metrics.parquet"):
        shutil.copy(smoke_run / name, checkout / name)
    with pytest.raises(FileNotFoundError, match=r"neither latents\.pt nor checkpoint\.pt .*studylib latents"):
        run_latents(checkout)
    shutil.copy(smoke_run / "checkpoint.pt", checkout / "checkpoint.pt")
    dumped = run_latents(checkout, progress=False)  # dumped once, then read from latents.pt
    assert (checkout / "latents.pt").is_file() and torch.equal(dumped.frames["train"], latents.frames["train"])
    (checkout / "checkpoint.pt").unlink()
    assert torch.equal(run_latents(checkout).frames["valid"], latents.frames["valid"])
