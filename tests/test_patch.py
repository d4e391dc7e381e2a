"""`studylib.patch_codebooks`: the fix as a drop-in for the `encodec` package's own model.

Horizon: at decay 0.99 a relative threshold of 0.1 flags a code only after about 229 steps without use,
so the expiry test does not wait for codes to fall out of use; it follows the codes that EnCodec's
k-means leaves empty (600 frames for 1024 codes), which are dead from the first step on.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import torchrun_two_ranks
from torch import nn

from studylib import ExpiryConfig, patch_codebooks, unpatch_codebooks
from studylib.quantizers.ema import EuclideanCodebook
from studylib.quantizers.patch import codebook_problem, convert_codebook

encodec = pytest.importorskip("encodec")
core_vq = pytest.importorskip("encodec.quantization.core_vq")

FIXED = ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5)
UPSTREAM = ExpiryConfig(mode="upstream")
STATE = ("inited", "cluster_size", "embed", "embed_avg")
WORKER = Path(__file__).with_name("patch_ddp_worker.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def encodec_24khz(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation notice
        return encodec.EncodecModel.encodec_model_24khz(pretrained=False)


def codebooks(model: nn.Module) -> list[nn.Module]:
    return [layer._codebook for layer in model.quantizer.vq.layers]


def small_encodec_codebook(**kwargs) -> nn.Module:
    args = {"dim": 8, "codebook_size": 32, "kmeans_init": False, "decay": 0.9, "epsilon": 1e-4,
            "threshold_ema_dead_code": 1} | kwargs
    return core_vq.EuclideanCodebook(**args)


# Latents for the quantizer alone: a mixture of 2048 tight clusters, so a code set on a frame can own a
# cluster (iid Gaussian frames in 128 dimensions would hand every frame to the codes near the centre).
CENTRES = torch.randn(2048, 128, generator=torch.Generator().manual_seed(5))


def latents(step: int, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """[batch, 128, 75]: one second per item at 75 Hz, 600 frames per step as EnCodec per GPU."""
    g = torch.Generator().manual_seed(100_000 * seed + step)
    frames = CENTRES[torch.randint(0, len(CENTRES), (batch * 75,), generator=g)]
    frames = frames + 0.05 * torch.randn(frames.shape, generator=g)
    return frames.view(batch, 75, 128).transpose(1, 2)


# ------------------------------------------------------------------------------------- what it swaps


def test_patch_swaps_every_codebook_of_encodecs_model_and_shares_their_state():
    model = encodec_24khz()
    before = codebooks(model)
    buffers = [[cb._buffers[name] for name in STATE] for cb in before]
    keys = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    encoder = model.encoder

    assert patch_codebooks(model, expiry=FIXED) == 32
    after = codebooks(model)
    assert all(type(cb) is EuclideanCodebook for cb in after)
    for cb, old, tensors in zip(after, before, buffers):
        assert all(cb._buffers[name] is t for name, t in zip(STATE, tensors))  # same tensors: device, dtype
        assert (cb.decay, cb.epsilon, cb.kmeans_iters, cb.codebook_size, cb.dim) == (0.99, 1e-5, 50, 1024, 128)
        assert cb.expiry == FIXED and cb.init_fix and cb.training == old.training
    assert model.encoder is encoder
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys


def test_anything_else_is_left_alone_and_a_model_without_codebooks_says_so():
    from vector_quantize_pytorch import VectorQuantize

    wrong_shape = small_encodec_codebook()
    wrong_shape.cluster_size = torch.zeros(33)
    extra_buffer = small_encodec_codebook()
    extra_buffer.register_buffer("usage", torch.zeros(32))
    lookalikes = nn.ModuleDict({"lucidrains": VectorQuantize(dim=16, codebook_size=64), "shape": wrong_shape,
                                "extra": extra_buffer, "linear": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match="no EnCodec-style codebook") as err:
        patch_codebooks(lookalikes)
    assert "lucidrains._codebook" in str(err.value) and "cluster_size has shape (33,)" in str(err.value)
    assert "usage" in str(err.value)

    shared = small_encodec_codebook()
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared), "others": lookalikes})
    assert patch_codebooks(model, expiry=FIXED) == 1  # one module, reachable twice, replaced once
    assert model["a"] is model["b"][0] and isinstance(model["a"], EuclideanCodebook)
    assert model["others"] is lookalikes and lookalikes["shape"] is wrong_shape
    assert type(lookalikes["lucidrains"]._codebook).__name__ == "Codebook"

    with pytest.raises(TypeError, match="itself a codebook"):
        patch_codebooks(small_encodec_codebook())
    with pytest.raises(TypeError, match="ExpiryConfig"):
        patch_codebooks(model, expiry="fixed")
    assert codebook_problem(nn.Linear(2, 2)) is not None


def test_same_device_and_dtype_and_a_training_step_in_float64():
    model = nn.Sequential(small_encodec_codebook()).double()
    assert patch_codebooks(model, expiry=FIXED) == 1
    cb = model[0]
    assert all(cb._buffers[name].dtype == torch.float64 for name in STATE)
    x = torch.randn(200, 8, dtype=torch.float64)
    quantize, codes = cb.train()(x)
    assert quantize.dtype == torch.float64 and codes.shape == (200,) and int(cb.steps) == 1


def test_hooks_on_a_replaced_codebook_are_reported():
    model = nn.Sequential(small_encodec_codebook())
    model[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="hooks"):
        patch_codebooks(model)


# --------------------------------------------------------------------------------------- behaviour


def train_codec(model: nn.Module, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Encoder, RVQ (2 levels, 1.5 kbps), decoder, L1 + commitment, Adam; 0.25 s of noise per step."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # the codebooks draw from the global RNG, as EnCodec's
    losses, codes = [], []
    for _ in range(steps):
        x = torch.randn(1, 1, 19 * 320, generator=g) * 0.1
        q = model.quantizer(model.encoder(x), model.frame_rate, 1.5)
        loss = (model.decoder(q.quantized) - x).abs().mean() + q.penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        codes.append(q.codes)
    return losses, codes


@pytest.mark.slow
def test_upstream_patch_trains_bit_identically_to_encodec():
    theirs, ours = encodec_24khz(), encodec_24khz()
    assert patch_codebooks(ours, expiry=UPSTREAM) == 32
    assert all(cb.expiry.threshold == 2.0 for cb in codebooks(ours))  # EnCodec's own threshold
    their_losses, their_codes = train_codec(theirs, 20)
    our_losses, our_codes = train_codec(ours, 20)
    assert torch.equal(torch.stack(their_losses), torch.stack(our_losses))
    assert all(torch.equal(a, b) for a, b in zip(their_codes, our_codes))
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert list(theirs_sd) == list(ours_sd)
    assert all(torch.equal(theirs_sd[k], ours_sd[k]) for k in theirs_sd)
    # EnCodec's expiry fired on every step (19 frames for 1024 codes), and was lost as in EnCodec
    assert [int(cb.checks) for cb in codebooks(ours)[:2]] == [20, 20]
    assert int(codebooks(ours)[0].replaced_total) > 0


def quantizer_usage(quantizer: nn.Module, held_out: torch.Tensor) -> torch.Tensor:
    """Codes of level 0 that held-out frames use."""
    return quantizer.encode(held_out, 75, 0.75)[0].unique()


def test_fixed_patch_brings_dead_codes_back_and_they_stay_alive():
    """Drop-in mid-run: EnCodec's own quantizer trains 40 steps (1 level, 600 frames per step), then a
    copy is patched with the fixed expiry and both train 150 more steps on the same frames."""
    model = encodec_24khz()
    quantizer = model.quantizer.train()
    patch_codebooks(model, expiry=UPSTREAM)  # EnCodec's k-means, bit for bit, without its minute of CPU
    quantizer(latents(0), 75, 0.75)
    assert unpatch_codebooks(model) == 32
    assert type(codebooks(model)[0]) is core_vq.EuclideanCodebook
    for step in range(1, 40):
        quantizer(latents(step), 75, 0.75)  # EnCodec's class, its expiry and its bug

    theirs = copy.deepcopy(quantizer)
    assert patch_codebooks(model, expiry=FIXED) == 32
    ours = codebooks(model)[0]
    dead = (ours.cluster_size < 0.1 * ours.cluster_size.sum() / 1024).nonzero().squeeze(1)
    assert dead.numel() > 300  # k-means on 600 frames leaves >= 424 of 1024 codes empty
    held_out = latents(0, batch=64, seed=1)
    assert not torch.isin(dead, quantizer_usage(theirs, held_out)).any()

    used_by = {}
    for step in range(40, 190):
        theirs(latents(step), 75, 0.75)
        quantizer(latents(step), 75, 0.75)
        if step in (45, 189):  # the first check is on the 5th step after patching
            used_by[step] = {"theirs": quantizer_usage(theirs, held_out), "ours": quantizer_usage(quantizer, held_out)}
    assert int(ours.checks) == 30 and int(ours.replaced_total) >= dead.numel()
    back = torch.isin(dead, used_by[45]["ours"])
    stayed = torch.isin(dead, used_by[189]["ours"])
    assert back.float().mean() > 0.5, "dead codes come back within one check"  # measured 0.70
    assert (back & stayed).sum() > 0.75 * back.sum(), "and stay in use 145 steps later"  # 0.87
    assert not torch.isin(dead, used_by[189]["theirs"]).any(), "under EnCodec they stay dead"
    assert used_by[189]["ours"].numel() > 1.4 * used_by[189]["theirs"].numel()  # 736 vs 445 codes


def test_state_dict_round_trips_into_unpatched_encodec_and_unpatch_restores_the_originals():
    model = encodec_24khz()
    originals = codebooks(model)
    patch_codebooks(model, expiry=FIXED)
    for step in range(8):
        model.quantizer.train()(latents(step, batch=2), 75, 1.5)  # k-means, EMA and one expiry check
    assert int(codebooks(model)[0].replaced_total) > 0
    state = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = encodec_24khz(seed=1)
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    x = latents(99, batch=2)
    assert torch.equal(fresh.quantizer.encode(x, 75, 1.5), model.quantizer.encode(x, 75, 1.5))

    # switching the mode keeps the state and the originals; unpatching gives back EnCodec's modules
    assert patch_codebooks(model, expiry=UPSTREAM) == 32
    assert codebooks(model)[0].expiry.threshold == 2.0
    model.to(torch.float64)  # buffers moved after patching: the originals get the moved tensors back
    assert unpatch_codebooks(model) == 32
    assert all(a is b for a, b in zip(codebooks(model), originals))
    assert all(cb._buffers["embed"].dtype == torch.float64 for cb in originals)
    assert all(torch.equal(v.float(), state[k]) for k, v in model.state_dict().items())
    assert unpatch_codebooks(model) == 0
    fresh.quantizer.train()(latents(100, batch=2), 75, 1.5)  # loaded into EnCodec's code, it trains on


def test_convert_codebook_alone_keeps_the_values():
    theirs = small_encodec_codebook()
    embed = theirs.embed.clone()
    ours = convert_codebook(theirs, FIXED)
    assert torch.equal(ours.embed, embed) and bool(ours.inited)
    assert ours.decay == 0.9 and ours.epsilon == 1e-4


# -------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_patched_encodec_under_two_process_ddp_keeps_codebooks_identical(tmp_path):
    fixed, upstream = torchrun_two_ranks(WORKER, tmp_path, ("fixed", "upstream")).values()

    assert fixed[0]["patched"] == 32 and fixed[0]["class"] == "studylib.quantizers.ema"
    assert fixed[0]["checks"] == fixed[1]["checks"] == [2, 2]  # 10 steps, every 5
    assert fixed[0]["replaced_total"] == fixed[1]["replaced_total"] and fixed[0]["replaced_total"][0] > 0
    for name, value in fixed[0]["state"].items():
        assert torch.equal(value, fixed[1]["state"][name]), name  # statistics all-reduced every step
    for name, value in fixed[0]["params"].items():
        assert torch.equal(value, fixed[1]["params"][name]), name  # DDP itself works
    # control: EnCodec's semantics (rank-0 broadcast before the EMA, local counts after) drift apart
    key = "vq.layers.0._codebook.embed_avg"
    assert not torch.equal(upstream[0]["state"][key], upstream[1]["state"][key])
