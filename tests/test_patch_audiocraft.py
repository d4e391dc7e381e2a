"""`patch_codebooks` on AudioCraft's own quantizer (audiocraft 1.3.0 from PyPI, installed without its
dependencies by `make setup` and loaded by `studylib.quantizers.patch.load_audiocraft_quantization`, which skips
AudioCraft's package __init__ and MusicGen's dependencies).

The model is AudioCraft's 24 kHz EnCodec quantizer as its config builds it (config/model/encodec/
default.yaml + encodec_base_causal.yaml): 32 levels x 1024 codes, dimension 128, decay 0.99, k-means
init, threshold 2, quantizer dropout. Where a test trains through AudioCraft's own k-means it runs 10
Lloyd iterations (the class default) instead of the config's 50, which would only make it 5x slower.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun_two_ranks
from torch import nn

from studylib import ExpiryConfig, patch_codebooks, unpatch_codebooks
from studylib.quantizers.ema import EuclideanCodebook
from studylib.quantizers.patch import load_audiocraft_quantization

try:
    qz = load_audiocraft_quantization()
except ModuleNotFoundError as err:
    pytest.skip(f"AudioCraft's quantizer is not installed: {err}", allow_module_level=True)

FIXED = ExpiryConfig(mode="fixed", threshold=0.1, threshold_kind="relative", every=5)
UPSTREAM = ExpiryConfig(mode="upstream")
STATE = ("inited", "cluster_size", "embed", "embed_avg")
WORKER = Path(__file__).with_name("patch_audiocraft_ddp_worker.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def audiocraft_24khz(seed: int = 0, kmeans_iters: int = 50) -> nn.Module:
    """AudioCraft's `ResidualVectorQuantizer` with its 24 kHz EnCodec settings."""
    torch.manual_seed(seed)
    return qz.ResidualVectorQuantizer(dimension=128, n_q=32, q_dropout=True, bins=1024, decay=0.99,
                                      kmeans_init=True, kmeans_iters=kmeans_iters, threshold_ema_dead_code=2)


def codebooks(rvq: nn.Module) -> list[nn.Module]:
    return [layer._codebook for layer in rvq.vq.layers]


# --------------------------------------------------------------------------------- loader and swap


def test_the_loader_gives_audiocrafts_own_classes_without_running_its_package_init(monkeypatch):
    core_vq = sys.modules["audiocraft.quantization.core_vq"]
    assert qz.ResidualVectorQuantizer.__module__ == "audiocraft.quantization.vq"
    assert Path(core_vq.__file__).parts[-3:] == ("audiocraft", "quantization", "core_vq.py")
    assert "flashy.distrib.broadcast_tensors" in Path(core_vq.__file__).read_text()  # AudioCraft's, not encodec's
    assert not {"audiocraft.models", "audiocraft.data", "audiocraft.modules"} & set(sys.modules)
    assert load_audiocraft_quantization() is qz

    # without flashy it says what to install and leaves no half-imported AudioCraft behind
    for name in [n for n in sys.modules if n.split(".")[0] == "audiocraft"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flashy", None)
    with pytest.raises(ModuleNotFoundError, match="requirements-audiocraft.txt") as err:
        load_audiocraft_quantization()
    assert err.value.name == "flashy"
    assert not [n for n in sys.modules if n.split(".")[0] == "audiocraft"]


def test_patch_replaces_the_32_codebooks_of_audiocrafts_24khz_quantizer():
    rvq = audiocraft_24khz()
    before = codebooks(rvq)
    assert all(type(cb) is sys.modules["audiocraft.quantization.core_vq"].EuclideanCodebook for cb in before)
    buffers = [[cb._buffers[name] for name in STATE] for cb in before]
    keys = {k: (v.shape, v.dtype) for k, v in rvq.state_dict().items()}

    assert patch_codebooks(rvq, expiry=FIXED) == 32
    for cb, tensors in zip(codebooks(rvq), buffers):
        assert type(cb) is EuclideanCodebook and cb.expiry == FIXED
        assert all(cb._buffers[name] is t for name, t in zip(STATE, tensors))  # same tensors: device, dtype
        assert (cb.decay, cb.epsilon, cb.kmeans_iters, cb.codebook_size, cb.dim) == (0.99, 1e-5, 50, 1024, 128)
    assert {k: (v.shape, v.dtype) for k, v in rvq.state_dict().items()} == keys
    assert rvq.vq.layers[0].inited is codebooks(rvq)[0].inited  # AudioCraft's `inited` property reads ours


# --------------------------------------------------------------------------------------- behaviour


def train_steps(rvq: nn.Module, steps: int) -> tuple[list[tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]:
    """A 1x1 conv, AudioCraft's RVQ (quantizer dropout on) and MSE + commitment through Adam; 2 x 19 frames
    per step. Returns per step (quantized, codes, penalty, loss) and the final state dict."""
    torch.manual_seed(3)
    model = nn.ModuleDict({"proj": nn.Conv1d(128, 128, 1), "rvq": rvq}).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # dropout and codebooks draw from the global RNG, as AudioCraft's
    outputs = []
    for _ in range(steps):
        x = torch.randn(2, 128, 19, generator=g)
        q = rvq(model["proj"](x), 75)
        loss = (q.x - x).pow(2).mean() + q.penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        outputs.append((q.x.detach(), q.codes, q.penalty.detach(), loss.detach()))
    return outputs, model.state_dict()


@pytest.mark.slow
def test_upstream_patch_trains_bit_identically_to_audiocraft():
    theirs, ours = audiocraft_24khz(kmeans_iters=10), audiocraft_24khz(kmeans_iters=10)
    assert patch_codebooks(ours, expiry=UPSTREAM) == 32
    assert all(cb.expiry.threshold == 2.0 for cb in codebooks(ours))  # AudioCraft's own threshold
    their_steps, their_state = train_steps(theirs, 40)
    our_steps, our_state = train_steps(ours, 40)
    assert len({int(codes.shape[1]) for _, codes, _, _ in our_steps}) > 5  # the dropout varied the levels
    for step, (a, b) in enumerate(zip(their_steps, our_steps)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {step}"
    assert list(their_state) == list(our_state)
    assert all(torch.equal(their_state[k], our_state[k]) for k in their_state)  # buffers and weights
    assert all(bool(cb.inited) for cb in codebooks(theirs))  # every level went through AudioCraft's k-means
    assert int(codebooks(ours)[0].checks) == 40 and int(codebooks(ours)[0].replaced_total) > 0  # expiry fired


# A stream of 2048 tight clusters that all move at step MOVE: codes that served the old places fall out of use.
MOVE = 60
_G = torch.Generator().manual_seed(5)
BEFORE_MOVE = torch.randn(2048, 128, generator=_G)
AFTER_MOVE = BEFORE_MOVE + torch.randn(2048, 128, generator=_G)


def moving_clusters(step: int, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """[batch, 128, 75]: 1 s per item at 75 Hz, 600 frames per step as EnCodec per GPU; seed 1 is held out."""
    g = torch.Generator().manual_seed(100_000 * seed + step)
    centres = BEFORE_MOVE if step < MOVE else AFTER_MOVE
    frames = centres[torch.randint(0, len(centres), (batch * 75,), generator=g)]
    frames = frames + 0.05 * torch.randn(frames.shape, generator=g)
    return frames.view(batch, 75, 128).transpose(1, 2)


def codes_used(rvq: nn.Module, held_out: torch.Tensor) -> torch.Tensor:
    """Level-0 codes that the held-out frames use."""
    rvq.eval()
    used = rvq.encode(held_out)[:, 0].unique()
    rvq.train()
    return used


def test_fixed_patch_revives_codes_on_a_moving_stream_where_audiocraft_does_not():
    """Level 0 of the 24 kHz quantizer, 600 frames per step; a copy of AudioCraft's quantizer after its first
    step (k-means) is patched, both train 400 steps. Two kinds of dead codes: those AudioCraft's k-means
    leaves empty (dead from the start), and those that served the clusters before they moved (dead after
    ~229 steps at decay 0.99 and relative threshold 0.1)."""
    rvq = audiocraft_24khz()
    rvq.set_num_codebooks(1)
    patch_codebooks(rvq, expiry=UPSTREAM)  # AudioCraft's k-means, bit for bit, in a fraction of its time
    rvq.train()(moving_clusters(0), 75)
    assert unpatch_codebooks(rvq) == 32
    theirs = copy.deepcopy(rvq)
    assert patch_codebooks(rvq, expiry=FIXED) == 32
    ours = codebooks(rvq)[0]
    empty = ours.dead_mask().nonzero().squeeze(1)
    assert empty.numel() > 300  # k-means on 600 frames leaves >= 424 of 1024 codes empty

    arms = {"audiocraft": theirs, "patched": rvq}
    held_out_before, held_out_after = moving_clusters(MOVE - 1, 64, seed=1), moving_clusters(400, 64, seed=1)
    for step in range(1, 401):
        for arm in arms.values():
            arm(moving_clusters(step), 75)
        if step == MOVE - 1:
            replaced_before_move = int(ours.replaced_total)
            served = {name: codes_used(arm, held_out_before) for name, arm in arms.items()}
        if step == MOVE + 20:  # codes the old clusters used that the moved ones do not
            left = {name: used[~torch.isin(used, codes_used(arms[name], held_out_after))]
                    for name, used in served.items()}
    used = {name: codes_used(arm, held_out_after) for name, arm in arms.items()}

    assert not torch.isin(empty, used["audiocraft"]).any(), "AudioCraft never revives its empty codes"
    assert torch.isin(empty, used["patched"]).float().mean() > 0.6  # measured 0.87 (483 empty)
    assert left["audiocraft"].numel() > 30 and left["patched"].numel() > 30  # measured 65 and 164
    assert not torch.isin(left["audiocraft"], used["audiocraft"]).any(), "nor the codes the move left behind"
    assert torch.isin(left["patched"], used["patched"]).float().mean() > 0.4  # measured 0.57
    assert int(ours.replaced_total) > replaced_before_move + 100  # replaced after the move: measured 215
    assert used["patched"].numel() > 1.6 * used["audiocraft"].numel()  # measured 867 vs 443 codes


def test_state_dicts_load_strictly_both_ways():
    theirs = audiocraft_24khz(seed=1)
    theirs.set_num_codebooks(2)
    patch_codebooks(theirs, expiry=UPSTREAM)
    theirs.train()(moving_clusters(0, batch=2), 75)  # k-means of the first levels, through our fast path
    unpatch_codebooks(theirs)
    for step in range(1, 4):
        theirs(moving_clusters(step, batch=2), 75)  # AudioCraft's own EMA steps
    x = moving_clusters(99, batch=2, seed=1)

    ours = audiocraft_24khz(seed=2)
    assert patch_codebooks(ours, expiry=FIXED) == 32
    ours.load_state_dict(theirs.state_dict(), strict=True)  # AudioCraft checkpoint -> patched model
    ours.set_num_codebooks(2)
    assert torch.equal(ours.eval().encode(x), theirs.eval().encode(x))
    for step in range(4, 12):
        ours.train()(moving_clusters(step, batch=2), 75)  # two expiry checks
    assert int(codebooks(ours)[0].replaced_total) > 0

    back = audiocraft_24khz(seed=3)
    back.load_state_dict(ours.state_dict(), strict=True)  # patched model -> AudioCraft's classes
    back.set_num_codebooks(2)
    assert torch.equal(back.eval().encode(x), ours.eval().encode(x))
    assert unpatch_codebooks(ours) == 32
    assert all(type(cb) is type(codebooks(back)[0]) for cb in codebooks(ours))
    back.train()(moving_clusters(12, batch=2), 75)  # and it trains on in AudioCraft's code


# -------------------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_patched_audiocraft_keeps_codebooks_identical_under_flashys_buffer_averaging(tmp_path):
    fixed, control = torchrun_two_ranks(WORKER, tmp_path, ("fixed", "audiocraft")).values()

    assert fixed[0]["patched"] == 32 and fixed[0]["class"] == "studylib.quantizers.ema"
    assert fixed[0]["levels"] == fixed[1]["levels"] and len(set(fixed[0]["levels"])) > 3  # the same dropout
    assert fixed[0]["checks"][0] == fixed[1]["checks"][0] == 2  # 10 steps, every 5
    assert fixed[0]["replaced_total"] == fixed[1]["replaced_total"] and fixed[0]["replaced_total"][0] > 0
    # AudioCraft averages every buffer after each step; the patched codebooks were already identical, so
    # the averaging changed no bit on either rank, at any step
    assert fixed[0]["sync_changed"] == fixed[1]["sync_changed"] == [[]] * 10
    for name, value in fixed[0]["state"].items():
        assert torch.equal(value, fixed[1]["state"][name]), name
    for name, value in fixed[0]["params"].items():
        assert torch.equal(value, fixed[1]["params"][name]), name  # flashy's gradient averaging works
    # control: AudioCraft's own codebooks differ across ranks before every averaging (each rank's own EMA)
    assert all("vq.layers.0._codebook.embed_avg" in changed for r in control for changed in r["sync_changed"])
    for name, value in control[0]["state"].items():
        assert torch.equal(value, control[1]["state"][name]), name  # and are equal after it
