"""The peer arm: vector-quantize-pytorch's ResidualVQ behind our quantizer's interface, and in a Codec."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

pytest.importorskip("vector_quantize_pytorch")

from vector_quantize_pytorch import ResidualSimVQ  # noqa: E402

from studylib.model.codec import Codec, CodecConfig  # noqa: E402
from studylib.quantizers.ema import ResidualVectorQuantizer  # noqa: E402
from studylib.quantizers.peer import PeerResidualVQ, SimResidualVQ  # noqa: E402

torch.set_flush_denormal(True)


def small(**kwargs) -> PeerResidualVQ:
    return PeerResidualVQ(**{"dimension": 8, "n_q": 4, "bins": 32, "kmeans_iters": 3, **kwargs}).train()


@pytest.mark.parametrize("detach_residual", [False, True])
def test_forward_backward_like_ours(detach_residual):
    torch.manual_seed(0)
    q = small(detach_residual=detach_residual)
    x = torch.randn(2, 8, 50, requires_grad=True)
    out = q(x, 75.0, bandwidth=0.75)  # 32 bins at 75 Hz: 0.375 kbps per level -> 2 levels
    assert out.quantized.shape == x.shape
    assert out.codes.shape == (2, 2, 50) and out.codes.dtype == torch.long
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < 32
    assert out.bandwidth.item() == pytest.approx(0.75)
    assert out.penalty.dim() == 0 and torch.isfinite(out.penalty)
    ours = ResidualVectorQuantizer(dimension=8, n_q=4, bins=32, kmeans_iters=3, detach_residual=detach_residual)
    assert set(out.metrics) == set(ours.train()(x.detach(), 75.0, 0.75).metrics)
    # Straight-through as ours: the encoder gets the decoder's gradient once, whatever the residual does.
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bandwidth_rule_matches_ours():
    peer, ours = small(n_q=8, bins=1024), ResidualVectorQuantizer(dimension=8, n_q=8, bins=1024)
    for frame_rate in (75.0, 150.0, 50.0):
        assert peer.get_bandwidth_per_quantizer(frame_rate) == ours.get_bandwidth_per_quantizer(frame_rate)
        for bandwidth in (None, 0.0, 0.1, 1.5, 3.0, 6.0, 24.0):
            assert peer.get_num_quantizers_for_bandwidth(frame_rate, bandwidth) == \
                ours.get_num_quantizers_for_bandwidth(frame_rate, bandwidth)


@pytest.mark.parametrize("detach_residual", [False, True])
def test_all_levels_match_the_library_forward(detach_residual):
    """Our per-level loop is ResidualVQ.forward's: same codes, output, losses and codebook updates."""
    torch.manual_seed(0)
    q = small(detach_residual=detach_residual)
    library = copy.deepcopy(q.rvq)
    x = torch.randn(2, 8, 40) * 3
    for step in range(3):
        torch.manual_seed(step)
        out = q(x + step, 75.0)
        torch.manual_seed(step)
        quantized, indices, losses = library((x + step).transpose(1, 2))
        assert torch.equal(out.codes, indices.permute(2, 0, 1))
        # With a detached residual our output is straight-through as a whole: x + (q - x) rounds.
        torch.testing.assert_close(out.quantized, quantized.transpose(1, 2), rtol=0, atol=1e-6)
        assert torch.equal(out.penalty, losses.mean())
    for (name, ours), theirs in zip(q.rvq.state_dict().items(), library.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_expiry_replaces_codes_started_far_from_the_data():
    torch.manual_seed(0)
    q = PeerResidualVQ(dimension=8, n_q=1, bins=64, kmeans_init=False).train()  # uniform init near 0
    held_out = torch.randn(1, 8, 1000) + 10
    assert q.encode(held_out, 75.0).unique().numel() <= 2  # one corner code takes everything
    first = q(torch.randn(1, 8, 20) + 10, 75.0).metrics
    # Every code starts at usage 1 < 2; with 20 frames the library replaces 20 of the 64 and defers the rest.
    assert first["replaced_l0"] == 20
    assert first["dead_l0"] == int(q.codebooks[0].dead_mask().sum()) == 44
    for _ in range(10):
        out = q(torch.randn(1, 8, 20) + 10, 75.0)
    assert int(q.codebooks[0].replaced_total) >= 64
    assert out.metrics["used_l0"] > 5
    assert q.encode(held_out, 75.0).unique().numel() >= 48


def test_resume_state_replays_a_step():
    torch.manual_seed(0)
    q = small(quantizer_dropout=True, generator=torch.Generator().manual_seed(1))
    q(torch.randn(2, 8, 30), 75.0)
    x = torch.randn(2, 8, 30) + 2  # shifted: codes expire and are replaced by random frames
    saved, buffers = q.resume_state(), copy.deepcopy(q.state_dict())
    first = q(x, 75.0)
    q.load_state_dict(buffers)
    q.load_resume_state(saved)
    again = q(x, 75.0)
    assert torch.equal(first.codes, again.codes)
    assert torch.equal(first.quantized, again.quantized)
    assert {k: float(v) for k, v in first.metrics.items()} == {k: float(v) for k, v in again.metrics.items()}


def test_codec_with_the_peer_quantizer_trains():
    torch.manual_seed(0)
    codec = Codec(dataclasses.replace(CodecConfig.tiny(), quantizer="vqtorch")).train()
    assert isinstance(codec.quantizer, PeerResidualVQ)
    optimizer = torch.optim.Adam(codec.parameters(), lr=1e-3)
    wav = torch.randn(2, 1, 12_000) * 0.1
    for _ in range(3):
        out = codec(wav, 1.5)
        loss = (out.audio - wav).abs().mean() + out.penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert {"used_l0", "perplexity_l1", "dead_l1", "replaced_l0"} <= set(out.metrics)
    codes = codec.eval().encode(wav, 3.0)
    assert codes.shape == (4, 2, 38)
    assert codec.decode(codes).shape == (2, 1, 38 * 320)


def test_quantizer_config_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="quantizer"):
        CodecConfig(quantizer="lucidrains")
    relative = dataclasses.replace(CodecConfig.tiny().expiry, mode="fixed", threshold_kind="relative")
    with pytest.raises(ValueError, match="absolute"):
        CodecConfig(quantizer="vqtorch", expiry=relative)
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "studylib.quantizers.peer")
    with pytest.raises(ImportError, match="pip install vector-quantize-pytorch"):
        Codec(dataclasses.replace(CodecConfig.tiny(), quantizer="vqtorch"))


# ------------------------------------------------------------------------------ the collapse-free peer (simvq)


def small_sim(**kwargs) -> SimResidualVQ:
    return SimResidualVQ(**{"dimension": 8, "n_q": 4, "bins": 32, **kwargs}).train()


def test_simvq_all_levels_match_the_library_forward():
    """With the library's detached residual, our loop is ResidualSimVQ.forward's: same codes, losses and output."""
    torch.manual_seed(0)
    q = small_sim(detach_residual=True)
    library = ResidualSimVQ(dim=8, num_quantizers=4, codebook_size=32, rotation_trick=False)
    library.load_state_dict({k: v for k, v in q.rvq.state_dict().items() if not k.endswith("usage.counts")})
    x = torch.randn(2, 8, 40)
    out = q(x, 75.0)
    quantized, indices, losses = library(x.transpose(1, 2))
    assert torch.equal(out.codes, indices.permute(2, 0, 1))
    assert torch.equal(out.penalty, losses.mean())  # codebook 1.0 + commitment 0.25 per level, mean over levels
    torch.testing.assert_close(out.quantized, quantized.transpose(1, 2), rtol=0, atol=1e-6)
    assert torch.equal(q.encode(x, 75.0), out.codes)


def test_simvq_codes_move_only_through_the_learned_map_and_nothing_is_written_in_place():
    torch.manual_seed(0)
    q = small_sim()
    tensors = dict(q.named_parameters()) | dict(q.named_buffers())
    before = {name: (t.detach().clone(), t._version) for name, t in tensors.items()}
    x = torch.randn(2, 8, 30, requires_grad=True)
    out = q(x, 75.0)
    maps = [layer.code_transform.weight for layer in q.rvq.layers]
    cotangent = torch.randn_like(x)
    from_output = torch.autograd.grad((out.quantized * cotangent).sum(), [x, *maps], retain_graph=True,
                                      allow_unused=True)
    assert torch.equal(from_output[0], cotangent)  # the encoder gets the decoder's gradient once, as in our RVQ
    assert all(g is None or not g.any() for g in from_output[1:])  # straight-through: the codes learn from the loss
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(out.penalty, maps, retain_graph=True))
    out.penalty.backward()
    changed = {name for name, t in tensors.items()
               if t._version != before[name][1] or not torch.equal(t.detach(), before[name][0])}
    assert changed == {f"rvq.layers.{i}.usage.counts" for i in range(4)}  # the frozen bases stay frozen
    assert [n for n, _ in q.named_buffers() if n.endswith("frozen_codebook")] == \
        [f"rvq.layers.{i}.frozen_codebook" for i in range(4)]


def test_simvq_reports_like_the_other_arms_at_whole_bits():
    torch.manual_seed(0)
    q = small_sim(n_q=8, bins=1024)
    ours = ResidualVectorQuantizer(dimension=8, n_q=8, bins=1024, kmeans_iters=3)
    assert q.get_bandwidth_per_quantizer(75.0) == ours.get_bandwidth_per_quantizer(75.0) == 0.75  # 10 bits
    x = torch.randn(2, 8, 50)
    out = q(x, 75.0, 6.0)
    assert out.codes.shape[0] == 8 and out.bandwidth.item() == pytest.approx(6.0)
    assert set(out.metrics) == set(ours.train()(x, 75.0, 6.0).metrics)
    assert int(out.metrics["dead_l0"]) == int(q.codebooks[0].dead_mask().sum()) == 1024 - int(
        (q.codebooks[0].usage.counts >= 2).sum())
    codes = q.eval().encode(x, 75.0, 1.5)
    assert codes.shape == (2, 2, 50) and q.decode(codes).shape == x.shape
