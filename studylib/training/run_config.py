"""The one flat config of a training run (`TrainConfig`) and the quantizer axes it shares with quantizer-only runs
(`QuantizerFields`): defaults, validated once; `params/*.yaml` are overlays of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from studylib.core import config as cfglib
from studylib.model.codec import QUANTIZERS, CodecConfig
from studylib.quantizers.ema import MODES, THRESHOLD_KINDS, ExpiryConfig

PRESETS = ("tiny", "small", "encodec_24khz")
DEVICES = ("auto", "cpu", "cuda")
DDP_BUFFERS = ("average", "none")
STATUSES = ("running", "complete", "failed", "interrupted")
# Fields that say how a run executes, not what it trains: left out of its config hash (run folders, resume).
NOT_HASHED = ("run_dir", "progress", "compile", "milestones")



@dataclass(frozen=True)
class QuantizerFields:
    """The ablation axes shared by codec runs and quantizer-only runs (see quantization.ExpiryConfig)."""

    # or "vqtorch": vector-quantize-pytorch's ResidualVQ, the peer arm; "dac": DAC's factorized RVQ; "simvq": the
    # collapse-free peer (codec.QUANTIZERS; for dac and simvq expiry_mode is "none" and only expiry_threshold and
    # decay apply, to their reported dead codes)
    quantizer: str = "ours"
    expiry_mode: str = "upstream"
    expiry_threshold: float = 2.0
    expiry_threshold_kind: str = "absolute"
    expiry_every: int = 1
    expiry_replaced_usage: float | None = None
    expiry_sync: bool = True
    init_fix: bool | None = None
    bins: int = 1024
    kmeans_iters: int = 50
    decay: float = 0.99

    def expiry(self) -> ExpiryConfig:
        """The expiry config; its errors name our `expiry_*` field."""
        try:
            return ExpiryConfig(mode=self.expiry_mode, threshold=self.expiry_threshold,
                                threshold_kind=self.expiry_threshold_kind, every=self.expiry_every,
                                replaced_usage=self.expiry_replaced_usage, sync=self.expiry_sync)
        except ValueError as e:
            raise ValueError(f"expiry_{e}") from None



@dataclass(frozen=True)
class TrainConfig(QuantizerFields):
    """Every knob of a training run. `params/*.yaml` overlay these defaults."""

    # data: 8 x 1 s per rank at 75 Hz = 600 frames per step, EnCodec's per-GPU regime
    manifest: str = "data/ci/manifest.csv"
    segment_seconds: float = 1.0
    batch_size: int = 8
    # codec: a preset, optionally narrowed
    model: str = "small"
    n_filters: int | None = None
    lstm_layers: int | None = None
    n_q: int | None = None
    init: str | None = None  # codec.INITS; None = the preset's (small, tiny: unit_gain; encodec_24khz: pytorch)
    # the codec's bitrates in kbps (None: the preset's); one level of K = 4096 at 75 Hz is 0.9 kbps
    target_bandwidths: tuple[float, ...] | None = None
    # the fine-tuning regime: a run folder or checkpoint whose encoder and decoder weights this run starts from
    # (the quantizer starts fresh: k-means on the first batch, as EnCodec), and an encoder that is not trained
    init_from: str = ""
    freeze_encoder: bool = False
    detach_residual: bool = False
    # EnCodec samples one target bandwidth per batch (kbps); must be among the model's bandwidths
    bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
    # optimisation (EnCodec: Adam 3e-4, betas 0.5 / 0.9, no warm-up, no clipping)
    steps: int = 2000
    lr: float = 3.0e-4
    beta1: float = 0.5
    beta2: float = 0.9
    warmup_steps: int = 0  # linear lr warm-up from 0 over this many steps
    # quantizer warm-up: the first quantizer_warmup steps train the autoencoder without quantization;
    # the codebooks' k-means then runs on at least kmeans_frames frames (0: on the first quantized batch,
    # as EnCodec; more frames are gathered from extra training batches through the current encoder)
    quantizer_warmup: int = 0
    kmeans_frames: int = 0
    grad_clip: float = 0.0
    # losses. balancer: EnCodec's loss balancer (losses.Balancer): the weights below are shares of the
    # gradient at the codec's output; false: a raw weighted sum. The commitment stays outside it.
    balancer: bool = False
    weight_l1: float = 0.1
    weight_mel: float = 1.0
    weight_sisdr: float = 0.0  # -SI-SDR of the output (dB), a gain-free waveform term
    weight_commit: float = 1.0
    # EnCodec's MS-STFT discriminator (hinge + feature matching, weights 3 / 3); ~7 s a step on 2 cores
    adversarial: bool = False
    weight_adv: float = 3.0
    weight_feat: float = 3.0
    adversarial_from: int = 0  # first step with adversarial terms
    # bookkeeping
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 10
    valid_every: int = 250
    valid_items: int = 32
    valid_bandwidth: float = 6.0
    checkpoint_every: int = 250
    # steps whose checkpoint is also kept as checkpoint_step<N>.pt (evaluated later: the long-horizon milestones)
    milestones: tuple[int, ...] = ()
    device: str = "auto"
    # bfloat16 autocast of the encoder, decoder and reconstruction losses (the quantizer, its statistics and the
    # balancer's norms stay float32); on CPU only where the CPU has native bf16 (avx512_bf16 or amx_bf16)
    bf16: bool = False
    # torch.compile the encoder and decoder for training steps (the quantizer stays eager). How a run executes,
    # not what it computes (equal to float rounding): not part of the config hash, so a run resumes either way.
    compile: bool = False
    ddp_buffers: str = "average"  # codebook buffers after each step under DDP: averaged (AudioCraft) or left
    progress: bool = True

    # added after runs were committed: at these values a config hashes as it did before them (cfglib.config_hash)
    HASH_NEUTRAL: ClassVar[dict[str, Any]] = {"target_bandwidths": None, "init_from": "", "freeze_encoder": False}

    def __post_init__(self) -> None:
        if self.target_bandwidths is not None:
            object.__setattr__(self, "target_bandwidths", tuple(self.target_bandwidths))
        if self.freeze_encoder and not self.init_from:
            raise ValueError("freeze_encoder: true needs init_from (the trained run whose encoder is frozen)")
        cfglib.check_choice("model", self.model, PRESETS)
        cfglib.check_choice("quantizer", self.quantizer, QUANTIZERS)
        cfglib.check_choice("expiry_mode", self.expiry_mode, MODES)
        cfglib.check_choice("expiry_threshold_kind", self.expiry_threshold_kind, THRESHOLD_KINDS)
        cfglib.check_choice("device", self.device, DEVICES)
        cfglib.check_choice("ddp_buffers", self.ddp_buffers, DDP_BUFFERS)
        positive = ("segment_seconds", "batch_size", "steps", "lr", "log_every", "valid_every", "valid_items",
                    "checkpoint_every", "bins")
        for field in dataclasses.fields(self):  # NaN passes every comparison below, Inf the lower bounds
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name}: got {value!r}, allowed a finite number"
                                 + (" > 0" if field.name in positive else ""))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: got {self.seed!r}, allowed an integer >= 0")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, allowed a value > 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, allowed a number in [0, 1)")
        for name in ("weight_l1", "weight_mel", "weight_sisdr", "weight_commit", "grad_clip", "weight_adv",
                     "weight_feat", "adversarial_from", "warmup_steps", "quantizer_warmup", "kmeans_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, allowed a number >= 0")
        if not self.bandwidths:
            raise ValueError("bandwidths: got an empty list, allowed a non-empty list of kbps")
        for step in self.milestones:  # one beyond `steps` is never reached (e.g. a shortened run): not an error
            if not step > 0:
                raise ValueError(f"milestones: got {step}, allowed steps >= 1")
        self.expiry()  # validates the expiry_* fields, naming them
        codec = self.codec_config()  # validates the model fields
        if (self.quantizer_warmup or self.kmeans_frames) and self.quantizer != "ours":
            raise ValueError(f"quantizer_warmup, kmeans_frames: apply to quantizer 'ours' only, got quantizer "
                             f"{self.quantizer!r}")
        for bw in (*self.bandwidths, self.valid_bandwidth):
            if bw not in codec.target_bandwidths:
                raise ValueError(f"bandwidths: {bw} is not one of the model's {codec.target_bandwidths}")

    @property
    def frames_per_step(self) -> int:
        """Latent frames one rank quantizes per step (EnCodec: 8 x 1 s x 75 Hz = 600)."""
        return self.batch_size * math.ceil(self.segment_seconds * self.codec_config().frame_rate)

    def codec_config(self) -> CodecConfig:
        base = getattr(CodecConfig, self.model)()
        overrides = {k: v for k, v in (("n_filters", self.n_filters), ("lstm_layers", self.lstm_layers),
                                       ("n_q", self.n_q), ("init", self.init),
                                       ("target_bandwidths", self.target_bandwidths)) if v is not None}
        return CodecConfig(**{**cfglib.to_dict(base), **overrides, "bins": self.bins, "decay": self.decay,
                              "kmeans_iters": self.kmeans_iters, "expiry": self.expiry(), "init_fix": self.init_fix,
                              "detach_residual": self.detach_residual, "quantizer": self.quantizer})
