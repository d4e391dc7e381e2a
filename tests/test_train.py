"""The training loop: config errors before anything is written, determinism, bit-exact resume, NaN stop, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, SMOKE, SMOKE_RUN, smoke_config, train_killed_then_resumed

from studylib.training import train as trainlib


def comparable(run_dir: Path):
    """Metrics without wall-clock columns, and the final weights and codebooks."""
    import pandas as pd

    metrics = pd.read_parquet(run_dir / "metrics.parquet").drop(columns=["seconds"], errors="ignore")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return metrics, state["model"]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "sets, message",
    [
        (["learning_rate=0.1"], "learning_rate: unknown key; allowed keys: "),
        (["lr=3e-4"], "lr: got the string '3e-4', expected a number (write floats as 3.0e-4"),
        (["steps=ten"], "steps: got 'ten', expected an integer"),
        (["expiry_mode=broken"], "expiry_mode: got 'broken', allowed ('none', 'upstream', 'fixed')"),
        (["expiry_mode=fixed", "expiry_every=0"], "expiry_every: got 0, allowed an integer >= 1"),
        (["bandwidths=[6.0]"], "bandwidths: 6.0 is not one of the model's (1.5, 3.0)"),
    ],
)
def test_bad_params_exit_2_with_one_line_before_writing(tmp_path, capsys, sets, message):
    run_dir = tmp_path / "run"
    code = trainlib.cli([str(SMOKE), "--set", f"run_dir={run_dir}", *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("studylib train: " + message.split(",")[0]) and message in err
    assert len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_unknown_params_file_is_an_error(tmp_path, capsys):
    assert trainlib.cli([str(tmp_path / "missing.yaml")]) == 2
    assert "no such params file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the runs


@pytest.fixture
def reference_run(smoke_run) -> Path:
    return smoke_run


def test_run_writes_manifest_metrics_and_checkpoint(reference_run):
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 0
    assert manifest["config"]["expiry_mode"] == "fixed" and len(manifest["config_hash"]) == 10
    assert manifest["versions"]["torch"].startswith("2.11.0")
    assert manifest["frames_per_step"] == 2 * 38  # 2 crops x 0.5 s at 75 Hz
    metrics, _ = comparable(reference_run)
    train_rows = metrics[metrics.split == "train"]
    assert list(train_rows.step) == [5, 10, 15, 20]
    for column in ("loss", "l1", "mel", "commit", "bandwidth", "used_l0", "perplexity_l0", "dead_l0", "replaced_l0",
                   "dead_now_l3", "replaced_total_l3"):
        assert column in metrics.columns, column
    assert list(metrics[metrics.split == "valid"].step) == [10, 20]
    assert train_rows.replaced_total_l0.iloc[-1] > 0


def test_same_config_and_seed_give_identical_metrics(reference_run, synthetic_manifest, tmp_path):
    run = trainlib.train(smoke_config(synthetic_manifest, tmp_path / "again", **SMOKE_RUN))
    a, b = comparable(reference_run), comparable(run.run_dir)
    assert a[0].equals(b[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_like_trains_a_run_again_from_its_stored_config_to_the_same_bits(reference_run, tmp_path, capsys):
    """A committed run whose checkpoint is lost (they stay out of git) is trained again from its manifest.json alone;
    never into its own folder, whose tables are committed."""
    assert trainlib.cli(["--like", str(reference_run)]) == 2
    assert f"--like {reference_run}: give the new run its own folder" in capsys.readouterr().err
    assert trainlib.cli(["--like", str(tmp_path / "nothing"), "--set", f"run_dir={tmp_path / 'x'}"]) == 2
    assert f"--like: {tmp_path / 'nothing'} is not a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert trainlib.cli(["--like", str(tmp_path / "empty"), "--set", f"run_dir={tmp_path / 'x'}"]) == 2
    assert "manifest.json does not exist or holds no config" in capsys.readouterr().err
    assert trainlib.cli(["--like", str(reference_run), "--set", f"run_dir={tmp_path / 'again'}"]) == 0
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    first = json.loads((reference_run / "manifest.json").read_text())
    assert {**again["config"], "run_dir": None} == {**first["config"], "run_dir": None}
    a, b = comparable(reference_run), comparable(tmp_path / "again")
    assert a[0].equals(b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_killed_run_resumes_to_the_same_result(reference_run, synthetic_manifest, tmp_path, monkeypatch):
    cfg = smoke_config(synthetic_manifest, tmp_path / "killed", **SMOKE_RUN)
    cfg_dir = train_killed_then_resumed(cfg, 13, monkeypatch)
    manifest = json.loads((cfg_dir / "manifest.json").read_text())
    assert manifest["resumed_at_step"] == 10
    # the training clock goes on across sessions: logged seconds never fall, train_seconds counts both sessions
    seconds = pd.read_parquet(cfg_dir / "metrics.parquet").query("split == 'train'").seconds
    assert seconds.is_monotonic_increasing, list(seconds)
    assert manifest["train_seconds"] >= seconds.iloc[-1] > 0
    a, b = comparable(reference_run), comparable(cfg_dir)
    assert a[0].equals(b[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_nan_stops_the_run_with_status_failed(synthetic_manifest, tmp_path, monkeypatch):
    real_batch = trainlib._train_batch
    monkeypatch.setattr(trainlib, "_train_batch", lambda *a: real_batch(*a) * float("nan"))
    run = trainlib.train(smoke_config(synthetic_manifest, tmp_path / "nan"))
    assert run.status == "failed"
    manifest = json.loads((tmp_path / "nan" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "nan" in manifest["error"].lower()


def test_resume_refuses_another_config_in_the_same_folder(reference_run, synthetic_manifest):
    with pytest.raises(ValueError, match="^run_dir: .* holds a run of another config"):
        trainlib.train(smoke_config(synthetic_manifest, reference_run, expiry_mode="none"))


@pytest.mark.slow
def test_torchrun_two_ranks_keep_fixed_codebooks_identical(synthetic_manifest, tmp_path):
    run_dir = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "studylib.training.train", str(SMOKE), "--set", f"manifest={synthetic_manifest}", "--set",
           f"run_dir={run_dir}", "--set", "progress=false", "--set", "expiry_mode=fixed", "--set",
           "expiry_threshold=1.0", "--set", "ddp_buffers=none", "--set", "steps=12"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    ranks = [torch.load(run_dir / f"rank{r}_codebooks.pt") for r in (0, 1)]
    assert any(int(v.sum()) > 0 for k, v in ranks[0].items() if k.endswith("replaced_total"))
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key


def test_adversarial_terms_train_and_resume(synthetic_manifest, tmp_path):
    """The MS-STFT discriminator path: its losses are logged and its state is checkpointed."""
    cfg = smoke_config(synthetic_manifest, tmp_path / "adv", adversarial=True, steps=4, log_every=2,
                       valid_every=4, checkpoint_every=2, segment_seconds=0.25, batch_size=1)
    assert trainlib.train(cfg).status == "complete"
    metrics, _ = comparable(tmp_path / "adv")
    train_rows = metrics[metrics.split == "train"]
    assert {"disc", "g_adv", "feat"} <= set(train_rows.columns) and train_rows.disc.notna().all()
    ckpt = torch.load(tmp_path / "adv" / "checkpoint.pt", weights_only=True)
    assert "disc" in ckpt and "disc_optimizer" in ckpt


def test_peer_quantizer_arm_trains_through_the_same_loop(synthetic_manifest, tmp_path):
    pytest.importorskip("vector_quantize_pytorch")
    cfg = smoke_config(synthetic_manifest, tmp_path / "peer", quantizer="vqtorch", steps=4, log_every=2,
                       valid_every=4, checkpoint_every=2)
    assert trainlib.train(cfg).status == "complete"
    metrics, state = comparable(tmp_path / "peer")
    assert metrics[metrics.split == "train"].used_l0.gt(0).all()
    assert any(k.startswith("quantizer.rvq.") for k in state)


# ------------------------------------------------------------------------------- the cpu recipe's parts

RECIPE = {"balancer": True, "weight_l1": 1.0, "weight_mel": 2.0, "weight_sisdr": 1.0, "warmup_steps": 4,
          "quantizer_warmup": 12, "kmeans_frames": 200}


@pytest.fixture(scope="module")
def recipe_run(synthetic_manifest, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    assert trainlib.train(smoke_config(synthetic_manifest, run_dir, **RECIPE)).status == "complete"
    return run_dir


def test_recipe_run_logs_the_balancer_warmups_and_held_out_scores(recipe_run):
    metrics, _ = comparable(recipe_run)
    train_rows, valid_rows = metrics[metrics.split == "train"], metrics[metrics.split == "valid"]
    warm, quantized = train_rows[train_rows.step <= 12], train_rows[train_rows.step > 12]
    assert (warm.commit == 0).all() and warm.used_l0.isna().all()  # no quantizer during its warm-up
    assert (quantized.used_l0 > 0).all() and (quantized.commit > 0).all()
    shares = train_rows[["norm_share_l1", "norm_share_mel", "norm_share_sisdr"]]
    assert ((shares.sum(axis=1) - 1).abs() < 1e-6).all()
    assert train_rows.lr.iloc[0] == pytest.approx(3.0e-4)  # step 5 (0-based 4) is past the 4-step lr warm-up
    for column in ("si_sdr", "mel_distance", "sisdr", "l1", "mel"):
        assert valid_rows[column].notna().all(), column
    assert valid_rows.set_index("step").perplexity_l0.isna().tolist() == [True, False]  # step 10: warm-up


def test_recipe_run_resumes_to_the_same_result(recipe_run, synthetic_manifest, tmp_path, monkeypatch):
    """Killed after the quantizer's warm-up (k-means at step 12) and resumed from step 10: same bits."""
    cfg = smoke_config(synthetic_manifest, tmp_path / "killed", **RECIPE)
    a, b = comparable(recipe_run), comparable(train_killed_then_resumed(cfg, 14, monkeypatch))
    assert a[0].equals(b[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_lr_warmup_ramps_linearly(synthetic_manifest, tmp_path):
    cfg = smoke_config(synthetic_manifest, tmp_path / "lr", warmup_steps=10, log_every=1, steps=12,
                       valid_every=12, checkpoint_every=12)
    metrics, _ = comparable(trainlib.train(cfg).run_dir)
    lr = metrics[metrics.split == "train"].set_index("step").lr
    assert lr[1] == pytest.approx(3.0e-5) and lr[5] == pytest.approx(1.5e-4) and lr[11] == pytest.approx(3.0e-4)


@pytest.mark.parametrize("sets, message", [
    (["quantizer=vqtorch", "quantizer_warmup=5"], "quantizer_warmup, kmeans_frames: apply to quantizer 'ours'"),
    (["weight_sisdr=-1.0"], "weight_sisdr: got -1.0, allowed a number >= 0"),
    (["init=xavier"], "init: got 'xavier', allowed ('pytorch', 'unit_gain')"),
])
def test_bad_recipe_params_are_one_line_errors(tmp_path, capsys, sets, message):
    run_dir = tmp_path / "run"
    code = trainlib.cli([str(SMOKE), "--set", f"run_dir={run_dir}", *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


# ------------------------------------------------------------------ the regime map's training options


def test_a_frozen_encoder_starts_from_the_source_and_stays_while_the_decoder_trains(smoke_run, synthetic_manifest,
                                                                                     tmp_path):
    source = torch.load(smoke_run / "checkpoint.pt", weights_only=True)["model"]
    run_dir = tmp_path / "frozen"
    cfg = smoke_config(synthetic_manifest, run_dir, init_from=str(smoke_run), freeze_encoder=True, steps=3)
    assert trainlib.train(cfg).status == "complete"
    _, state = comparable(run_dir)
    encoder = [k for k in source if k.startswith("encoder.")]
    decoder = [k for k in source if k.startswith("decoder.")]
    assert encoder and all(torch.equal(state[k], source[k]) for k in encoder), "a frozen encoder does not move"
    assert any(not torch.equal(state[k], source[k]) for k in decoder), "the decoder trains on from the source's"
    inited = [k for k in source if k.endswith("embed")]
    assert inited and any(not torch.equal(state[k], source[k]) for k in inited), "the quantizer starts fresh"


def test_the_regime_options_leave_earlier_run_names_alone_and_check_their_values(synthetic_manifest, tmp_path):
    from studylib.core import config as cfglib

    plain = smoke_config(synthetic_manifest, tmp_path)
    same = smoke_config(synthetic_manifest, tmp_path, target_bandwidths=None, init_from="", freeze_encoder=False)
    assert cfglib.config_hash(plain) == cfglib.config_hash(same), "committed runs keep their names"
    single = smoke_config(synthetic_manifest, tmp_path, n_q=1, bins=4096, target_bandwidths=[0.9], bandwidths=[0.9],
                          valid_bandwidth=0.9)
    assert cfglib.config_hash(single) != cfglib.config_hash(plain)
    assert single.codec_config().target_bandwidths == (0.9,)
    with pytest.raises(ValueError, match="freeze_encoder: true needs init_from"):
        smoke_config(synthetic_manifest, tmp_path, freeze_encoder=True)


def test_init_from_a_run_of_another_shape_is_one_line_naming_it(smoke_run, synthetic_manifest, tmp_path, capsys):
    run_dir = tmp_path / "wider"
    code = trainlib.cli([str(SMOKE), "--set", f"manifest={synthetic_manifest}", "--set", f"run_dir={run_dir}",
                         "--set", f"init_from={smoke_run}", "--set", "n_filters=8", "--set", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(smoke_run) in err[0] and "encoder does not fit" in err[0]


def test_a_complete_run_whose_checkpoint_is_gone_is_read_not_trained_again(synthetic_manifest, tmp_path):
    """A fresh checkout has a committed run's files but not its checkpoint: a notebook that calls train_run on it
    (06's variants) renders from its metrics instead of training it from scratch over them."""
    run_dir = tmp_path / "variant"
    overrides = {"manifest": str(synthetic_manifest), "progress": False, "steps": 4, "log_every": 2}
    first = trainlib.train_run([str(SMOKE)], overrides, run_dir)
    (run_dir / "checkpoint.pt").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    again = trainlib.train_run([str(SMOKE)], overrides, run_dir)
    pd.testing.assert_frame_equal(again, first)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == stamps, "nothing trained, nothing written"
    # another config in the same folder is not "finished": it trains (and the folder's run is replaced)
    assert not trainlib.finished_on_disk(smoke_config(synthetic_manifest, run_dir, steps=5, log_every=2))
    assert trainlib.finished_on_disk(smoke_config(synthetic_manifest, run_dir, steps=4, log_every=2))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    assert not trainlib.finished_on_disk(smoke_config(synthetic_manifest, run_dir, steps=4, log_every=2))
