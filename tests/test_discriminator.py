"""MS-STFT discriminator: shapes, gradients, parity with encodec 0.1.1's reference, and the hinge/feature losses."""

from __future__ import annotations

import warnings

import pytest
import torch

from studylib.model.discriminator import (
    AdversarialLosses,
    MultiScaleSTFTDiscriminator,
    adversarial_g_loss,
    discriminator_loss,
    discriminator_step_loss,
    feature_matching_loss,
    generator_losses,
)

SR = 24_000
# (logit frames, logit bins, first feature map's bins) per default scale for 1 s at 24 kHz.
EXPECTED = [(90, 65, 513), (43, 129, 1025), (184, 33, 257)]


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def disc() -> MultiScaleSTFTDiscriminator:
    torch.manual_seed(0)
    return MultiScaleSTFTDiscriminator(filters=32)


def wav(batch: int = 2, seed: int = 0, seconds: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, 1, int(seconds * SR), generator=g)


def encodec_disc():
    msstftd = pytest.importorskip("encodec.msstftd")
    with warnings.catch_warnings():  # encodec uses the deprecated torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return msstftd.MultiScaleSTFTDiscriminator(filters=32)


# ------------------------------------------------------------------------------------------- shapes


def test_output_counts_and_shapes(disc):
    logits, fmaps = disc(wav(2))
    assert len(disc) == len(logits) == len(fmaps) == 3
    for logit, fmap, (frames, bins, first_bins) in zip(logits, fmaps, EXPECTED):
        assert logit.shape == (2, 1, frames, bins)
        assert len(fmap) == 5
        assert all(f.shape[:3] == (2, 32, frames) for f in fmap)
        assert [f.shape[3] for f in fmap] == [first_bins, *(((first_bins - 1) >> i) + 1 for i in (1, 2, 3)),
                                              bins]
        assert all(torch.isfinite(f).all() for f in fmap) and torch.isfinite(logit).all()


def test_rejects_mismatched_scales():
    with pytest.raises(ValueError, match="differ in length"):
        MultiScaleSTFTDiscriminator(n_ffts=(1024, 512), hop_lengths=(256,), win_lengths=(1024, 512))


def test_gradients_reach_discriminator_and_input(disc):
    disc.zero_grad()
    x = wav(2, seconds=0.25).requires_grad_(True)
    logits, fmaps = disc(x)
    (adversarial_g_loss(logits) + sum(f.mean() for fm in fmaps for f in fm)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in disc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    disc.zero_grad()


def test_parameter_count_matches_encodec(disc):
    ours = sum(p.numel() for p in disc.parameters())
    theirs = sum(p.numel() for p in encodec_disc().parameters())
    assert abs(ours - theirs) <= 0.2 * theirs
    assert ours == theirs  # same layers, same weight-norm placement


def test_matches_encodec_with_copied_weights():
    """Load encodec's effective conv weights into ours: identical logits and feature maps."""
    ref = encodec_disc().eval()
    ours = MultiScaleSTFTDiscriminator(filters=32).eval()
    with torch.no_grad():
        for mine, theirs in zip(ours.scales, ref.discriminators):
            for dst, src in zip([*mine.convs, mine.post], [*theirs.convs, theirs.conv_post]):
                conv = src.conv
                if hasattr(conv, "weight_g"):  # old-style weight norm: w = g * v / |v|, per output channel
                    w = conv.weight_g * conv.weight_v / torch.linalg.vector_norm(conv.weight_v, dim=(1, 2, 3),
                                                                                 keepdim=True)
                else:
                    w = conv.weight
                if hasattr(dst, "parametrizations"):
                    dst.weight = w.clone()  # weight norm's right inverse splits it into magnitude and direction
                else:
                    dst.weight.copy_(w)
                dst.bias.copy_(conv.bias)
        x = wav(1, seed=3)
        (lo, fo), (lr, fr) = ours(x), ref(x)
    for a, b in zip(lo, lr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for ma, mb in zip(fo, fr):
        for a, b in zip(ma, mb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- losses


def test_hinge_losses_on_hand_made_logits():
    shapes = [(2, 1, 5, 7), (2, 1, 3, 4)]
    plus2 = [torch.full(s, 2.0) for s in shapes]
    minus2 = [torch.full(s, -2.0) for s in shapes]
    zeros = [torch.zeros(s) for s in shapes]
    assert discriminator_loss(plus2, minus2).item() == 0.0  # confident and right: no loss
    assert discriminator_loss(minus2, plus2).item() == pytest.approx(6.0)  # relu(1+2) + relu(1+2)
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(2.0)
    assert adversarial_g_loss(zeros).item() == pytest.approx(1.0)
    assert adversarial_g_loss(plus2).item() == 0.0
    assert adversarial_g_loss(minus2).item() == pytest.approx(3.0)
    # Averaged over scales, each scale a mean over its own elements (sizes differ).
    mixed = [torch.zeros(shapes[0]), torch.full(shapes[1], -1.0)]
    assert adversarial_g_loss(mixed).item() == pytest.approx((1.0 + 2.0) / 2)
    with pytest.raises(ValueError):
        discriminator_loss(plus2, minus2[:1])


def test_feature_matching_zero_for_identical_maps(disc):
    with torch.no_grad():
        _, fmaps = disc(wav(1, seconds=0.25))
    assert feature_matching_loss(fmaps, fmaps).item() == 0.0
    zeros = [[torch.zeros(1, 4, 3, 3)]]
    assert feature_matching_loss(zeros, zeros).item() == 0.0  # eps guard: no 0/0


def test_feature_matching_is_relative_l1():
    real = [[torch.full((1, 2, 3, 3), 2.0), torch.full((1, 2, 3, 3), -4.0)], [torch.full((1, 2, 5, 5), 1.0)]]
    fake = [[torch.full((1, 2, 3, 3), 1.0), torch.full((1, 2, 3, 3), -4.0)],
            [torch.full((1, 2, 5, 5), 1.5, requires_grad=True)]]
    # scale 0: (|2-1|/2 + 0/4) / 2 = 0.25; scale 1: 0.5/1 = 0.5; mean = 0.375
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(0.375)
    loss.backward()
    assert fake[1][0].grad is not None
    with pytest.raises(ValueError):
        feature_matching_loss(real, fake[:1])


def test_step_helpers(disc):
    disc.zero_grad()
    real, fake = wav(1, seed=1, seconds=0.25), wav(1, seed=2, seconds=0.25).requires_grad_(True)
    losses = generator_losses(disc, real, fake)
    assert isinstance(losses, AdversarialLosses) and losses.feat.item() > 0
    (losses.g_adv + losses.feat).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    fake.grad = None
    d_loss = discriminator_step_loss(disc, real, fake)
    d_loss.backward()
    assert fake.grad is None  # the codec gets nothing from the discriminator's loss
    assert d_loss.item() > 0
    disc.zero_grad()
