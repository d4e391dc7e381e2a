"""The training-speed settings (issue 17): the hand-differentiated mel loss, bf16 autocast on CPU and its refusal
without native bf16, torch.compile of the encoder and decoder with the uncompiled state dict, and what must not
change in a fast setting (upstream == none, bit-exact resume)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import smoke_config, train_killed_then_resumed

from studylib.core.config import UserError
from studylib.model.codec import Codec
from studylib.model.losses import MultiScaleMelLoss, _MelLoss
from studylib.training import train as trainlib
from studylib.training.run_folder import read_checkpoint

# ------------------------------------------------------------------------------------------ mel loss


def signals(length: int = 24_000, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = 0.1 * torch.randn(batch, 1, length, generator=g)
    return (0.7 * ref + 0.05 * torch.randn(batch, 1, length, generator=g)).requires_grad_(), ref


def test_mel_loss_value_and_gradient_equal_its_autograd_definition():
    loss = MultiScaleMelLoss()
    est, ref = signals()
    expected = loss.autograd_loss(est, ref)
    (expected_grad,) = torch.autograd.grad(expected, est)
    got = loss(est, ref)
    (got_grad,) = torch.autograd.grad(got, est)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-3, atol=1e-4 * expected_grad.abs().max().item())
    # a scaled upstream gradient (the balancer's) scales the hand-made one
    (scaled,) = torch.autograd.grad(3.0 * loss(est, ref), est)
    torch.testing.assert_close(scaled, 3 * got_grad)


def test_mel_loss_hand_gradient_passes_gradcheck():
    """Finite differences in float64 through every branch: reflect padding, overlap-add, rfft's adjoint, the
    log term's clamp and both signs."""
    loss = MultiScaleMelLoss(scales=(5, 6, 7), n_mels=16).double()
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 400, generator=g, dtype=torch.float64)
    est = (0.8 * ref + 0.3 * torch.randn(2, 400, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: _MelLoss.apply(e, ref, loss), (est,), eps=1e-6, atol=1e-5)


def test_mel_loss_without_gradient_keeps_nothing():
    loss = MultiScaleMelLoss()
    est, ref = signals(length=4_800)
    with torch.no_grad():
        value = loss(est, ref)
    assert not value.requires_grad and value.item() == pytest.approx(loss.autograd_loss(est, ref).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------- bf16


def test_bf16_without_native_support_is_refused_before_anything_is_written(synthetic_manifest, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(trainlib, "missing_cpu_bf16", lambda: "no avx512_bf16 or amx_bf16 in /proc/cpuinfo")
    cfg = smoke_config(synthetic_manifest, tmp_path / "run", bf16=True, device="cpu")
    with pytest.raises(UserError, match=r"^bf16: this CPU has no native bfloat16 \(no avx512_bf16 or amx_bf16"):
        trainlib.train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(trainlib.missing_cpu_bf16() is None, reason="this CPU has native bf16: nothing to refuse")
def test_bf16_refusal_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    from conftest import SMOKE

    code = trainlib.cli([str(SMOKE), "--set", f"run_dir={tmp_path / 'run'}", "--set", "bf16=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("studylib train: bf16: this CPU has no native bfloat16")
    assert not (tmp_path / "run").exists()


def test_bf16_step_runs_the_networks_in_bf16_and_the_quantizer_in_float32(synthetic_manifest, tmp_path):
    cfg = smoke_config(synthetic_manifest, tmp_path / "run", bf16=True, balancer=True, weight_sisdr=1.0)
    parts = trainlib.build_parts(cfg, torch.device("cpu"))
    seen = {}

    def record(name: str, tensor: torch.Tensor) -> None:  # a forward hook returning a value would replace the output
        seen.setdefault(name, tensor.dtype)

    parts.model.decoder.model[-1].register_forward_hook(lambda m, i, o: record("decoder", o))
    parts.model.quantizer.register_forward_hook(lambda m, i, o: record("quantizer_in", i[0]))
    wav = 0.1 * torch.randn(cfg.batch_size, 1, 12_000, generator=torch.Generator().manual_seed(0))
    scalars = trainlib.train_step(parts, cfg, wav, 1.5, 0)
    assert seen == {"decoder": torch.bfloat16, "quantizer_in": torch.float32}
    assert torch.isfinite(scalars["loss"])
    buffers = [b for name, b in parts.model.quantizer.named_buffers() if name.endswith(("embed", "cluster_size"))]
    assert buffers and all(b.dtype == torch.float32 and torch.isfinite(b).all() for b in buffers)
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in parts.model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------- compile


@pytest.fixture(scope="module")
def compiled_runs(synthetic_manifest, tmp_path_factory) -> dict[str, Path]:
    """Smoke runs with compile: true of `upstream` and `none` (same seed)."""
    runs = {}
    for mode in ("upstream", "none"):
        run_dir = tmp_path_factory.mktemp("compiled") / mode
        cfg = smoke_config(synthetic_manifest, run_dir, compile=True, expiry_mode=mode, expiry_threshold=2.0)
        assert trainlib.train(cfg).status == "complete"
        runs[mode] = run_dir
    return runs


@pytest.mark.slow
def test_compiled_checkpoint_holds_the_plain_state_dict(compiled_runs, synthetic_manifest):
    ckpt = read_checkpoint(compiled_runs["none"] / "checkpoint.pt")
    cfg = smoke_config(synthetic_manifest, compiled_runs["none"])
    codec = Codec(cfg.codec_config())
    assert list(ckpt["model"]) == list(codec.state_dict())
    codec.load_state_dict(ckpt["model"], strict=True)


@pytest.mark.slow
def test_upstream_still_equals_none_bit_for_bit_when_compiled(compiled_runs):
    a, b = (pd.read_parquet(compiled_runs[m] / "metrics.parquet").drop(columns="seconds") for m in ("upstream", "none"))
    replaced = [c for c in a if c.startswith("replaced")]  # upstream counts its lost replacements; none has none
    pd.testing.assert_frame_equal(a.drop(columns=replaced), b.drop(columns=replaced))
    sa, sb = (read_checkpoint(compiled_runs[m] / "checkpoint.pt")["model"] for m in ("upstream", "none"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_compiled_run_resumes_bit_exactly_and_either_way(compiled_runs, synthetic_manifest, tmp_path, monkeypatch):
    cfg = smoke_config(synthetic_manifest, tmp_path / "resumed", compile=True, expiry_mode="none",
                       expiry_threshold=2.0)
    resumed = train_killed_then_resumed(cfg, kill_at_step=13, monkeypatch=monkeypatch)
    a, b = (pd.read_parquet(d / "metrics.parquet").drop(columns="seconds") for d in (resumed, compiled_runs["none"]))
    pd.testing.assert_frame_equal(a, b)
    # compile is not part of the config's identity: an eager process takes the compiled run's checkpoint
    eager = smoke_config(synthetic_manifest, tmp_path / "resumed", compile=False, expiry_mode="none",
                         expiry_threshold=2.0)
    assert trainlib.train(eager).status == "complete"


def test_compile_and_milestones_leave_the_config_hash_alone(synthetic_manifest, tmp_path):
    from studylib.core import config as cfglib

    plain = smoke_config(synthetic_manifest, tmp_path / "a")
    fast = smoke_config(synthetic_manifest, tmp_path / "b", compile=True, milestones=[10])
    assert cfglib.config_hash(plain, exclude=trainlib.NOT_HASHED) == cfglib.config_hash(fast,
                                                                                        exclude=trainlib.NOT_HASHED)
    assert cfglib.config_hash(plain, exclude=trainlib.NOT_HASHED) != cfglib.config_hash(
        smoke_config(synthetic_manifest, tmp_path / "c", bf16=True), exclude=trainlib.NOT_HASHED)
