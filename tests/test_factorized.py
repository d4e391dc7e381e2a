"""DAC's factorized residual VQ (`quantizer: dac`): its defining properties; and the arms whose codebooks are
learned by gradient (dac, simvq) through the codec, the training loop (checkpoint, bit-exact resume), evaluation
and the audit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE, smoke_config, train_killed_then_resumed

from studylib.analysis.audit import audit, audit_usage
from studylib.model.codec import Codec, CodecConfig
from studylib.quantizers.ema import ExpiryConfig, ResidualVectorQuantizer
from studylib.quantizers.factorized import FactorizedResidualVQ
from studylib.training import train as trainlib
from studylib.training.evaluate import evaluate

torch.set_flush_denormal(True)


def small(**kwargs) -> FactorizedResidualVQ:
    """The outside check's size: D 32, 4 levels of 64 codes in 8 dims."""
    return FactorizedResidualVQ(**{"dimension": 32, "n_q": 4, "bins": 64, "codebook_dim": 8, **kwargs}).train()


def spread_code_norms_(q: FactorizedResidualVQ) -> None:
    """Codes of very different lengths, so that cosine, dot product and Euclidean distance pick differently."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in q.layers:
            layer.codebook.weight.mul_(torch.rand(q.bins, 1, generator=g) * 10 + 0.1)


# ---------------------------------------------------------------------------------------- the lookup


def test_codes_are_the_argmax_of_cosine_similarity_in_the_projected_space():
    torch.manual_seed(0)
    q = small()
    spread_code_norms_(q)
    x = torch.randn(3, 32, 40)
    out = q(x, 75.0)
    assert out.codes.shape == (4, 3, 40) and out.codes.dtype == torch.long
    residual, other_rules_differ = x, False
    with torch.no_grad():
        for level, layer in enumerate(q.layers):
            z = layer.in_proj(residual).transpose(1, 2).double()  # [B, T, d]
            book = layer.codebook.weight.double()  # [K, d]
            cosine = F.cosine_similarity(z[:, :, None, :], book[None, None], dim=-1)  # [B, T, K]
            assert torch.equal(out.codes[level], cosine.argmax(-1)), level
            euclid, dot = torch.cdist(z, book[None].expand(3, -1, -1)).argmin(-1), (z @ book.t()).argmax(-1)
            other_rules_differ |= bool((euclid != out.codes[level]).any() and (dot != out.codes[level]).any())
            residual = residual - layer.out_proj(layer.codebook.weight[out.codes[level]].transpose(1, 2))
    assert other_rules_differ  # the check above could tell cosine from the other rules
    assert torch.equal(q.encode(x, 75.0), out.codes)


def test_each_level_has_the_projections_and_an_embedding_codebook():
    q = small()
    layer = q.layers[2]
    assert isinstance(layer.codebook, torch.nn.Embedding) and layer.codebook.weight.shape == (64, 8)
    assert layer.in_proj(torch.randn(2, 32, 5)).shape == (2, 8, 5)
    assert layer.out_proj(torch.randn(2, 8, 5)).shape == (2, 32, 5)
    names = {name for name, _ in layer.in_proj.named_parameters()}  # weight norm: magnitude and direction
    assert names == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}


# ------------------------------------------------------------------------------------------ gradients


def _grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


def test_codebook_learns_only_from_the_codebook_loss_and_the_encoder_from_commitment_and_straight_through():
    torch.manual_seed(0)
    layer = small().layers[0]
    x = torch.randn(2, 32, 30, requires_grad=True)
    out = layer(x)
    book = layer.codebook.weight
    in_proj, out_proj = list(layer.in_proj.parameters()), list(layer.out_proj.parameters())
    cotangent = torch.randn_like(out.quantized)
    decoder_path = (out.quantized * cotangent).sum()

    g_book, g_x, *g_in = _grads(out.codebook_loss, [book, x, *in_proj])
    assert g_book.abs().sum() > 0 and not g_x.any() and not any(g.any() for g in g_in)
    g_book, g_x, *g_in = _grads(out.commitment_loss, [book, x, *in_proj])
    assert not g_book.any() and g_x.abs().sum() > 0 and all(g.abs().sum() > 0 for g in g_in)
    g_book, g_x = _grads(decoder_path, [book, x])
    assert not g_book.any()  # the straight-through output passes nothing to the codebook
    # ... and passes the decoder's gradient to the encoder as if there were no quantizer: out_proj(in_proj(x))
    unquantized = (layer.out_proj(layer.in_proj(x)) * cotangent).sum()
    torch.testing.assert_close(g_x, _grads(unquantized, [x])[0], rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in _grads(decoder_path, out_proj))


def test_whole_rvq_penalty_weights_and_codebooks_untouched_by_the_output():
    torch.manual_seed(0)
    q = small()
    x = torch.randn(2, 32, 30, requires_grad=True)
    out = q(x, 75.0)
    residual, expected = x, 0.0
    for layer in q.layers:  # the penalty: 1.0 x codebook + 0.25 x commitment, summed over the levels used
        level = layer(residual)
        expected = expected + level.codebook_loss + 0.25 * level.commitment_loss
        residual = residual - level.quantized
    torch.testing.assert_close(out.penalty, expected)
    books = [layer.codebook.weight for layer in q.layers]
    assert not any(g.any() for g in _grads((out.quantized * torch.randn_like(x)).sum(), books))
    assert all(g.abs().sum() > 0 for g in _grads(out.penalty, books))


def test_no_tensor_is_written_in_place_by_training_but_the_reporting_ema():
    """Forward + backward in training mode leave every parameter and buffer as it was (same values, same in-place
    version counter), except `usage.counts`: the EMA of code counts that only `dead_mask()` reads."""
    torch.manual_seed(0)
    q = small()
    tensors = dict(q.named_parameters()) | dict(q.named_buffers())
    before = {name: (t.detach().clone(), t._version) for name, t in tensors.items()}
    out = q(torch.randn(2, 32, 30), 75.0)
    (out.quantized.square().mean() + out.penalty).backward()
    changed = {name for name, t in tensors.items()
               if t._version != before[name][1] or not torch.equal(t.detach(), before[name][0])}
    assert changed == {f"layers.{i}.usage.counts" for i in range(4)}
    # nothing in the forward reads the reporting EMA: scrambling it changes no output
    x = torch.randn(2, 32, 30)
    first = q.eval()(x, 75.0)
    for layer in q.layers:
        layer.usage.counts.uniform_(0, 5)
    again = q(x, 75.0)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.quantized, again.quantized)


# ------------------------------------------------------------------------------- init "unit_gain"


def test_unit_gain_projections_are_an_orthogonal_projection_with_zero_biases():
    q = small(init="unit_gain")
    for layer in q.layers:
        w_in, w_out = layer.in_proj.weight[..., 0].detach(), layer.out_proj.weight[..., 0].detach()  # [d, D], [D, d]
        torch.testing.assert_close(w_in @ w_in.t(), torch.eye(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(w_out, w_in.t(), atol=1e-6, rtol=0)
        assert not layer.in_proj.bias.any() and not layer.out_proj.bias.any()
        x = torch.randn(2, 32, 7)
        once = layer.out_proj(layer.in_proj(x))
        torch.testing.assert_close(layer.out_proj(layer.in_proj(once)), once, atol=1e-5, rtol=0)  # P P = P
    assert not torch.equal(q.layers[0].in_proj.weight, q.layers[1].in_proj.weight)  # each level its own subspace
    dac = small()  # DAC's init: PyTorch's projections, no projection
    w = dac.layers[0].in_proj.weight[..., 0].detach()
    assert not torch.allclose(w @ w.t(), torch.eye(8), atol=1e-2)


def test_unit_gain_codebook_is_scaled_to_the_latents_once_at_its_first_training_forward(tmp_path):
    torch.manual_seed(0)
    q = small(init="unit_gain")
    books = [layer.codebook.weight.detach().clone() for layer in q.layers]
    assert not any(bool(layer.inited) for layer in q.layers)
    x = torch.randn(2, 32, 30) * 0.05  # latents far smaller than N(0, 1) codes
    q.eval()(x, 75.0)  # evaluation does not initialise
    assert all(torch.equal(layer.codebook.weight, b) for layer, b in zip(q.layers, books))
    out = q.train()(x, 75.0)
    residual = x
    for level, (layer, before) in enumerate(zip(q.layers, books)):
        z_e = layer.in_proj(residual).detach()
        book = layer.codebook.weight.detach()
        torch.testing.assert_close(book.square().mean().sqrt(), z_e.square().mean().sqrt())  # the latents' RMS
        torch.testing.assert_close(F.normalize(book, dim=-1), F.normalize(before, dim=-1))  # directions kept
        assert bool(layer.inited), level
        residual = residual - layer.out_proj(layer.codebook.weight[out.codes[level]].transpose(1, 2)).detach()
    # later forwards, and a quantizer loaded from a checkpoint, do not scale again
    scaled = [layer.codebook.weight.detach().clone() for layer in q.layers]
    q(x * 10, 75.0)
    assert all(torch.equal(layer.codebook.weight, b) for layer, b in zip(q.layers, scaled))
    torch.save(q.state_dict(), tmp_path / "q.pt")
    again = small(init="unit_gain")
    again.load_state_dict(torch.load(tmp_path / "q.pt"), strict=True)
    again(x * 10, 75.0)
    assert all(torch.equal(layer.codebook.weight, b) for layer, b in zip(again.layers, scaled))


def test_a_checkpoint_from_before_inited_loads_as_initialised():
    old = {k: v for k, v in small().state_dict().items() if not k.endswith(".inited")}
    q = small(init="unit_gain")
    q.load_state_dict(old, strict=True)
    assert all(bool(layer.inited) for layer in q.layers)


def test_the_codec_init_reaches_the_dac_quantizer():
    def quantizer(init: str) -> FactorizedResidualVQ:
        config = dataclasses.replace(CodecConfig.tiny(), quantizer="dac", expiry=ExpiryConfig(mode="none"), init=init)
        return Codec(config, generator=torch.Generator().manual_seed(0)).quantizer
    unit, dac = quantizer("unit_gain"), quantizer("pytorch")
    assert not bool(unit.layers[0].inited) and bool(dac.layers[0].inited)
    assert not unit.layers[0].in_proj.bias.any() and dac.layers[0].in_proj.bias.any()


@pytest.mark.parametrize("kwargs, message", [
    ({"init": "kmeans"}, "init: got 'kmeans', allowed ('dac', 'unit_gain')"),
    ({"init": "unit_gain", "codebook_dim": 40}, "codebook_dim: got 40 > dimension 32, allowed <= dimension"),
])
def test_bad_init_is_a_one_line_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        small(**kwargs)


def test_reported_dead_codes_follow_an_ema_of_code_counts():
    q = small(n_q=1)
    layer = q.layers[0]
    out = q(torch.randn(2, 32, 30), 75.0)
    counts = torch.bincount(out.codes.flatten(), minlength=64).float()
    torch.testing.assert_close(layer.usage.counts, 0.01 * counts)  # decay 0.99 from zero
    assert torch.equal(layer.dead_mask(), layer.usage.counts < 2.0)
    assert int(out.metrics["dead_l0"]) == int(layer.dead_mask().sum()) and int(out.metrics["replaced_l0"]) == 0
    assert int(out.metrics["used_l0"]) == int((counts > 0).sum())


# ----------------------------------------------------------------------------- levels, bits, round trip


def test_quantizer_dropout_draws_levels_as_the_other_arms():
    dac, ours = small(quantizer_dropout=True, generator=torch.Generator()), \
        ResidualVectorQuantizer(dimension=32, n_q=4, bins=64, quantizer_dropout=True, generator=torch.Generator())
    for frame_rate in (75.0, 50.0):  # the bandwidth -> levels rule and the bits: log2(64) = 6 a level
        assert dac.get_bandwidth_per_quantizer(frame_rate) == ours.get_bandwidth_per_quantizer(frame_rate)
        for bandwidth in (None, 0.45, 0.9, 1.0, 1.8, 3.0):
            assert dac.get_num_quantizers_for_bandwidth(frame_rate, bandwidth) == \
                ours.get_num_quantizers_for_bandwidth(frame_rate, bandwidth)
    dac.generator.manual_seed(3)
    ours.generator.manual_seed(3)
    x = torch.randn(1, 32, 20)
    drawn = [(dac(x, 75.0, 1.35).codes.shape[0], ours.train()(x, 75.0, 1.35).codes.shape[0]) for _ in range(12)]
    assert [a for a, _ in drawn] == [b for _, b in drawn]  # one draw per batch, from the generator, as ours
    assert {a for a, _ in drawn} == {1, 2, 3}  # uniform in 1..3, the levels 1.35 kbps buys
    out = dac.eval()(x, 75.0, 1.35)
    assert out.codes.shape[0] == 3 and out.bandwidth.item() == pytest.approx(1.35)  # no dropout in eval


def test_encode_decode_round_trip_equals_the_forward():
    torch.manual_seed(0)
    q = small().eval()
    x = torch.randn(2, 32, 25)
    out = q(x, 75.0)
    codes = q.encode(x, 75.0)
    assert torch.equal(codes, out.codes)
    assert torch.equal(q.decode(codes), out.quantized)  # the straight-through value is exactly the code's
    assert torch.equal(q.encode(x, 75.0, 0.9), codes[:2])  # a lower bandwidth's codes are a prefix
    assert float(out.penalty) == 0.0 and out.metrics == {}


def test_the_codec_starts_from_the_other_arms_encoder_and_decoder():
    """The quantizer's parameters come from its generator, so arm none and arm dac pair seed by seed."""
    def codec(quantizer: str) -> tuple[Codec, torch.Tensor]:
        torch.manual_seed(0)
        config = dataclasses.replace(CodecConfig.tiny(), quantizer=quantizer, expiry=ExpiryConfig(mode="none"))
        return Codec(config, generator=torch.Generator().manual_seed(0)), torch.rand(3)  # + the global RNG's next

    (ours, next_ours), (dac, next_dac) = codec("ours"), codec("dac")
    assert torch.equal(next_ours, next_dac)
    for part in ("encoder", "decoder"):
        theirs = getattr(dac, part).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(ours, part).state_dict().items()), part
    other_seed = Codec(dac.config, generator=torch.Generator().manual_seed(1)).quantizer.layers[0].codebook.weight
    assert not torch.equal(other_seed, dac.quantizer.layers[0].codebook.weight)  # drawn from the generator


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("sets, message", [
    (["quantizer=dac"], "expiry_mode: got 'upstream' with quantizer 'dac', allowed 'none'"),
    (["quantizer=dac", "expiry_mode=none", "expiry_every=5"], "expiry_every: do not apply to quantizer 'dac'"),
    (["quantizer=simvq", "expiry_mode=none", "expiry_threshold_kind=relative", "init_fix=true"],
     "expiry_threshold_kind, init_fix: do not apply to quantizer 'simvq'"),
    (["quantizer=dac", "expiry_mode=none", "detach_residual=true"], "detach_residual: do not apply to quantizer 'dac'"),
    (["quantizer=dac", "expiry_mode=none", "kmeans_frames=600"],
     "quantizer_warmup, kmeans_frames: apply to quantizer 'ours' only"),
])
def test_options_that_do_not_apply_are_one_line_errors(tmp_path, capsys, sets, message):
    run_dir = tmp_path / "run"
    code = trainlib.cli([str(SMOKE), "--set", f"run_dir={run_dir}", *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_ddp_buffer_averaging_takes_the_reporting_ema_of_gradient_codebooks(monkeypatch):
    codec = Codec(dataclasses.replace(CodecConfig.tiny(), quantizer="dac", expiry=ExpiryConfig(mode="none")))
    averaged = []
    monkeypatch.setattr(trainlib.distributed, "all_reduce_sum_", lambda t: averaged.append(t) or t.mul_(2))
    trainlib._average_codebooks(codec, world=2)  # no EMA codebook (cluster_size, embed_avg) to average
    assert [t.data_ptr() for t in averaged] == [layer.usage.counts.data_ptr() for layer in codec.quantizer.layers]


# ---------------------------------------------------------------------------- through the training loop
# Both arms whose codebooks are learned by gradient: dac and the collapse-free peer (simvq, studylib.quantizers.peer).

LOOP = {"expiry_mode": "none", "steps": 8, "log_every": 2, "valid_every": 4, "checkpoint_every": 4}


@pytest.fixture(scope="module", params=["dac", "simvq"])
def gradient_run(request, synthetic_manifest, tmp_path_factory) -> tuple[str, Path]:
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    cfg = smoke_config(synthetic_manifest, run_dir, quantizer=request.param, **LOOP)
    assert trainlib.train(cfg).status == "complete"
    return request.param, run_dir


def _comparable(run_dir: Path):
    import pandas as pd

    metrics = pd.read_parquet(run_dir / "metrics.parquet").drop(columns=["seconds"])
    return metrics, torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


def test_arm_trains_and_logs_what_every_arm_logs(gradient_run):
    quantizer, run_dir = gradient_run
    metrics, state = _comparable(run_dir)
    train_rows = metrics[metrics.split == "train"]
    for column in ("used_l0", "perplexity_l1", "dead_l0", "replaced_l0", "dead_now_l3", "replaced_total_l3", "commit"):
        assert train_rows[column].notna().all(), column
    assert train_rows.used_l0.gt(0).all() and train_rows.replaced_total_l0.eq(0).all()
    assert sum(k.endswith("usage.counts") for k in state) == 4  # the reporting EMA is checkpointed
    assert json.loads((run_dir / "manifest.json").read_text())["config"]["quantizer"] == quantizer


def test_run_killed_and_resumed_ends_bit_identical(gradient_run, synthetic_manifest, tmp_path, monkeypatch):
    quantizer, run_dir = gradient_run
    cfg = smoke_config(synthetic_manifest, tmp_path / "killed", quantizer=quantizer, **LOOP)
    resumed = train_killed_then_resumed(cfg, 6, monkeypatch)
    assert json.loads((resumed / "manifest.json").read_text())["resumed_at_step"] == 4
    (a_metrics, a_state), (b_metrics, b_state) = _comparable(run_dir), _comparable(resumed)
    assert a_metrics.equals(b_metrics)
    assert a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)


def test_run_evaluates_at_its_nominal_bitrate_and_its_code_use_is_measured(gradient_run, synthetic_manifest):
    quantizer, run_dir = gradient_run
    result = evaluate(run_dir, "test", seconds=1.0, visqol_items=0, progress=False)
    assert set(result.items.bandwidth) == {1.5, 3.0}
    assert result.items.groupby("bandwidth").nominal_kbps.first().to_dict() == {1.5: 1.5, 3.0: 3.0}
    assert result.levels.dead.notna().all() and result.levels.entropy_kbps.gt(0).all()
    assert result.items.si_sdr.notna().all()
    codec, *_ = trainlib.load_checkpoint(run_dir)
    usage = audit_usage(codec, synthetic_manifest, 3.0)
    assert list(usage.level) == [0, 1, 2, 3] and usage.used.gt(0).all()
    with pytest.raises(ValueError, match=f"quantizer '{quantizer}' keeps no EMA statistics"):
        audit(run_dir)
