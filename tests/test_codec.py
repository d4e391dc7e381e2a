"""Codec: parity with the `encodec` package's 24 kHz model, config validation, shapes, training step."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from studylib.model.codec import Codec, CodecConfig, SEANetDecoder, SEANetEncoder, encodec_state_dict_to_codec

torch.set_flush_denormal(True)  # denormals make CPU steps vary 0.6-14 s


def noise_bursts(batch: int, length: int, seed: int) -> torch.Tensor:
    """Noise in 0.1 s segments of random loudness over 60 dB: random-weight encoders map stationary
    noise to nearly constant latents, which would quantize every frame to the same code."""
    g = torch.Generator().manual_seed(seed)
    gains = 10 ** (-3 * torch.rand(batch, 1, -(-length // 2_400), generator=g))  # [B, 1, segments]
    return torch.randn(batch, 1, length, generator=g) * gains.repeat_interleave(2_400, -1)[..., :length]


def encodec_24khz():
    """The `encodec` package's 24 kHz model with random weights, in eval mode."""
    encodec = pytest.importorskip("encodec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses torch's deprecated weight_norm
        return encodec.EncodecModel.encodec_model_24khz(pretrained=False)


@pytest.fixture(scope="module")
def reference():
    """A seeded random-weight EnCodec 24 kHz model (eval mode) whose 32 codebooks are initialised."""
    torch.manual_seed(0)
    model = encodec_24khz()
    # Level i's codes are drawn from the level-i residuals of its own slice of frames. (k-means on
    # fewer frames than codes would fit them exactly and leave every deeper level a zero residual.)
    with torch.no_grad():
        residual = model.encoder(noise_bursts(1, 8 * 24_000, seed=2))[0].t()  # [F, D]
        slices = torch.arange(len(residual)).chunk(model.quantizer.n_q)
        for layer, rows in zip(model.quantizer.vq.layers, slices, strict=True):
            codebook = layer._codebook
            codebook.embed.copy_(residual[rows][torch.randint(len(rows), (model.quantizer.bins,))])
            codebook.embed_avg.copy_(codebook.embed)
            codebook.cluster_size.fill_(1.0)
            codebook.inited.fill_(1.0)
            residual = residual - codebook.decode(codebook.encode(residual))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("bandwidth", [1.5, 6.0, 24.0])
def test_matches_encodec_24khz(reference, bandwidth):
    codec = Codec.from_encodec(reference.state_dict()).eval()
    wav = noise_bursts(2, 24_000 + 123, seed=1)
    reference.set_target_bandwidth(bandwidth)
    with torch.no_grad():
        expected_audio = reference(wav)
        (expected_codes, _scale), = reference.encode(wav)  # one frame: no segmenting at 24 kHz
        out = codec(wav, bandwidth)
        codes = codec.encode(wav, bandwidth)
    n_q = int(bandwidth / 0.75)
    assert out.codes.shape == (n_q, 2, 76)
    assert torch.equal(out.codes, expected_codes.transpose(0, 1))  # [B, K, F] -> [K, B, F]
    assert torch.equal(codes, out.codes)
    assert min(len(level.unique()) for level in out.codes) > 1  # no degenerate level
    assert out.audio.shape == wav.shape
    assert (out.audio - expected_audio).abs().max().item() <= 1e-4
    assert out.bandwidth.item() == pytest.approx(n_q * 0.75)


@pytest.mark.slow
def test_training_step_matches_encodec_24khz(reference):
    """Training mode: same audio, codes, penalty, gradients and codebook update as EnCodec's modules
    (encoder -> quantizer -> decoder; EncodecModel.forward itself does not train the quantizer)."""
    theirs = encodec_24khz()  # a copy (deepcopy fails on torch's legacy weight norm)
    theirs.load_state_dict(reference.state_dict())
    theirs.train()
    ours = Codec.from_encodec(reference.state_dict()).train()
    wav = noise_bursts(1, 12_000, seed=3)
    torch.manual_seed(3)  # dead-code expiry draws from the global RNG in both
    q = theirs.quantizer(theirs.encoder(wav), theirs.frame_rate, 6.0)
    expected_audio = theirs.decoder(q.quantized)[..., : wav.shape[-1]]
    ((expected_audio - wav).abs().mean() + q.penalty).backward()
    torch.manual_seed(3)
    out = ours(wav, 6.0)
    ((out.audio - wav).abs().mean() + out.penalty).backward()

    assert torch.equal(out.codes, q.codes)
    assert (out.audio - expected_audio).abs().max().item() <= 1e-4
    assert out.penalty.item() == pytest.approx(q.penalty.item(), rel=1e-5)
    grads = encodec_state_dict_to_codec({n: p.grad for n, p in theirs.named_parameters()})
    for name, param in ours.named_parameters():
        assert torch.allclose(param.grad, grads[name], rtol=1e-4, atol=1e-7), name
    buffers = encodec_state_dict_to_codec(dict(theirs.quantizer.named_buffers(prefix="quantizer")))
    ours_buffers = dict(ours.named_buffers())
    for name, buffer in buffers.items():
        assert torch.allclose(ours_buffers[name], buffer, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize(
    "options",
    [
        {"causal": False},
        {"causal": False, "pad_mode": "constant", "true_skip": True},
        {"norm": "none", "n_residual_layers": 2, "lstm_layers": 0, "ratios": (4, 3), "target_bandwidths": (20.0,)},
    ],
)
def test_seanet_matches_encodec_for_other_options(options):
    """Padding, trimming and layer order under the options the 24 kHz model does not use."""
    modules = pytest.importorskip("encodec.modules")
    config = dataclasses.replace(CodecConfig.tiny(), **options)
    kwargs = dict(
        channels=config.channels, dimension=config.dimension, n_filters=config.n_filters,
        n_residual_layers=config.n_residual_layers, ratios=list(config.ratios), norm=config.norm,
        causal=config.causal, pad_mode=config.pad_mode, true_skip=config.true_skip, lstm=config.lstm_layers,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pairs = [(modules.SEANetEncoder(**kwargs), SEANetEncoder(config)),
                 (modules.SEANetDecoder(**kwargs), SEANetDecoder(config))]
    x = torch.randn(2, 1, 1_001)
    with torch.no_grad():
        for theirs, ours in pairs:
            ours.load_state_dict(encodec_state_dict_to_codec(theirs.state_dict()), strict=True)
            assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=0)
            x = theirs(x)  # the encoder's latent feeds the decoder


def test_from_encodec_rejects_a_mismatched_config(reference):
    with pytest.raises(RuntimeError, match="state_dict"):
        Codec.from_encodec(reference.state_dict(), CodecConfig.small())


def test_presets_and_derived_properties():
    official = CodecConfig.encodec_24khz()
    assert (official.hop_length, official.frame_rate, official.bandwidth_per_quantizer) == (320, 75, 0.75)
    assert official.n_q * official.bandwidth_per_quantizer == official.target_bandwidths[-1] == 24.0
    small = CodecConfig.small()
    assert (small.ratios, small.dimension, small.bins, small.n_q) == ((8, 5, 4, 2), 128, 1024, 32)
    assert CodecConfig(ratios=[8, 5, 4, 2]) == official  # lists are stored as tuples


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0),
        ("n_filters", 2.5),
        ("lstm_layers", -1),
        ("ratios", ()),
        ("ratios", (8, 0)),
        ("causal", 1),
        ("norm", "batch_norm"),
        ("pad_mode", "zero"),
        ("compress", 64),
        ("bins", 1000),
        ("decay", 1.0),
        ("kmeans_iters", 0),
        ("expiry", "upstream"),
        ("init_fix", "yes"),
        ("target_bandwidths", (30.0,)),
        ("target_bandwidths", (6.0, 3.0)),
        ("target_bandwidths", (0.5,)),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: got .*allowed"):
        CodecConfig(**{field: value})


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("norm", ["weight_norm", "none"])
def test_lengths_for_any_input_length(causal, norm):
    config = dataclasses.replace(CodecConfig.tiny(), causal=causal, norm=norm, kmeans_init=False)
    codec = Codec(config).eval()
    for length in (1, 319, 320, 321, 4_799):
        wav = torch.randn(2, 1, length)
        frames = math.ceil(length / config.hop_length)
        with torch.no_grad():
            codes = codec.encode(wav, bandwidth=1.5)
            assert codes.shape == (2, 2, frames)  # 1.5 kbps = 2 levels
            assert codec.decode(codes).shape == (2, 1, frames * config.hop_length)
            assert codec(wav).audio.shape == wav.shape


def test_rejects_bad_inputs():
    codec = Codec(dataclasses.replace(CodecConfig.tiny(), kmeans_init=False))
    with pytest.raises(ValueError, match="wav"):
        codec(torch.randn(1, 2, 320))
    with pytest.raises(ValueError, match="bandwidth"):
        codec(torch.randn(1, 1, 320), bandwidth=6.0)


@pytest.mark.slow
def test_small_preset_trains():
    torch.manual_seed(0)
    # The first step runs 32 k-means inits (~0.4 s each at 50 iterations here); their length is the
    # quantizer's concern, so 2 iterations keep this test to seconds.
    codec = Codec(dataclasses.replace(CodecConfig.small(), kmeans_iters=2)).train()
    wav = 0.1 * torch.randn(2, 1, 1_600)
    out = codec(wav)
    loss = (out.audio - wav).abs().mean() + out.penalty
    loss.backward()
    assert out.audio.shape == wav.shape and out.codes.shape == (32, 2, 5)
    inited = [v for k, v in codec.state_dict().items() if k.endswith("_codebook.inited")]
    assert len(inited) == 32 and all(bool(v) for v in inited)  # k-means ran on every level
    # The straight-through estimator must carry the loss back to the encoder's first layer.
    for module in (codec.encoder.model[0], codec.decoder.model[-1]):
        assert module.weight_v.grad is not None and module.weight_v.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in codec.parameters() if p.grad is not None)
    assert out.metrics  # the quantizer's per-level usage metrics come through


def test_mixed_precision_keeps_the_quantizer_in_float32():
    torch.manual_seed(0)
    codec = Codec(CodecConfig.tiny()).train()
    wav = 0.1 * torch.randn(2, 1, 3_200)
    decoded = []
    codec.decoder.register_forward_hook(lambda m, i, o: decoded.append(o.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        out = codec(wav)
    assert decoded == [torch.bfloat16]  # the SEANet runs in bf16 ...
    assert out.audio.dtype == torch.float32  # ... and hands on float32 audio to the losses and the balancer
    ((out.audio.float() - wav).abs().mean() + out.penalty).backward()
    codebooks = [v for k, v in codec.state_dict().items() if k.endswith("_codebook.embed")]
    assert all(cb.dtype == torch.float32 and torch.isfinite(cb).all() for cb in codebooks)  # ... not the VQ


def latent_spread(config: CodecConfig) -> tuple[float, float]:
    """(std across a batch of different inputs, averaged over channels and frames; overall std) of a fresh
    codec's latent."""
    torch.manual_seed(0)
    codec = Codec(config)
    wav = 0.1 * noise_bursts(8, 24_000, seed=3)
    with torch.no_grad():
        latent = codec.encoder(wav)  # [B, D, F]
    return float(latent.std(0).mean()), float(latent.std())


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_fresh_cpu_presets_carry_the_signal_to_the_latent(preset):
    config = getattr(CodecConfig, preset)()
    assert config.init == "unit_gain"
    spread, std = latent_spread(config)
    assert spread >= 0.5 * std, (spread, std)
    # PyTorch's default init (EnCodec's) loses it: the latent is nearly the same for every input
    spread, std = latent_spread(dataclasses.replace(config, init="pytorch"))
    assert spread < 0.05 * std, (spread, std)


def test_unit_gain_output_follows_the_input_level():
    torch.manual_seed(0)
    codec = Codec(CodecConfig.small()).eval()
    wav = 0.1 * noise_bursts(4, 24_000, seed=4)
    with torch.no_grad():
        audio = codec.decoder(codec.encoder(wav))
    ratio = float(audio.std() / wav.std())
    assert 0.3 < ratio < 3, ratio  # PyTorch's init: a constant, input-independent output


def test_official_preset_keeps_pytorch_init():
    assert CodecConfig.encodec_24khz().init == "pytorch"
    with pytest.raises(ValueError, match="init: got 'xavier'"):
        CodecConfig(init="xavier")
