"""An EnCodec-compatible neural audio codec (SEANet encoder/decoder) whose quantizer is our residual VQ.

The network is EnCodec 0.1.1's, layer for layer, so an ``encodec`` state dict loads into it with
``strict=True`` (see `Codec.from_encodec`) and gives the same codes and audio. Three things differ on
purpose:

* Every convolution holds its kernel directly (``weight_g``/``weight_v``/``bias``) instead of EnCodec's
  ``SConv1d.conv.conv`` double wrapper; `encodec_state_dict_to_codec` drops that nesting from the keys.
* `Codec.forward` is a *training* forward (straight-through quantizer, commitment penalty, EMA codebook
  updates), where ``EncodecModel.forward`` only encodes and decodes. In eval mode the two are the same.
* Under autocast the quantizer still runs in float32 (`full_precision`); the SEANet follows autocast and
  its output is handed on as float32, so losses and loss balancing see float32 audio.
* `Codec.compile_networks()` compiles the encoder and decoder (torch.compile) for training steps only;
  the module tree, and so the state dict, stays the plain one.

Shapes: B batch, C audio channels, T samples, D latent dimension, F frames (= ceil(T / hop_length)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from studylib.quantizers.base import nominal_kbps
from studylib.quantizers.ema import ExpiryConfig, ResidualVectorQuantizer
from studylib.quantizers.factorized import FactorizedResidualVQ

# EnCodec 24 kHz: every codec here runs at it, the corpus is built at it and the metrics are taken at it
SAMPLE_RATE = 24_000
NORMS = ("weight_norm", "none")
QUANTIZERS = ("ours", "vqtorch", "dac", "simvq")
# Codebooks that are EMA statistics (k-means init, dead-code expiry); "dac" (studylib.quantizers.factorized) and "simvq"
# (studylib.quantizers.peer) learn theirs by gradient: no EMA, k-means or expiry, nothing to average across ranks or to
# audit.
EMA_QUANTIZERS = ("ours", "vqtorch")
PAD_MODES = ("reflect", "constant", "replicate")
# "pytorch": every kernel as PyTorch draws it (EnCodec's models); "unit_gain": zero biases and kernels of
# variance 1 / fan_in, so a fresh codec's latent and output follow its input (see `unit_gain_init_`; for quantizer
# dac also orthogonal projections and a codebook at the latents' scale: studylib.quantizers.factorized).
INITS = ("pytorch", "unit_gain")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CodecConfig:
    """Everything that defines a codec; the defaults are EnCodec's official 24 kHz model."""

    sample_rate: int = SAMPLE_RATE
    channels: int = 1
    n_filters: int = 32  # width of the outermost conv stage; doubles at every downsampling
    n_residual_layers: int = 1  # residual blocks per stage
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # decoder upsampling order; the encoder uses them reversed
    dimension: int = 128  # latent (and codebook) dimension D
    lstm_layers: int = 2  # SLSTM layers after the encoder / before the decoder convs; 0 = none
    causal: bool = True
    norm: str = "weight_norm"
    pad_mode: str = "reflect"
    kernel_size: int = 7  # first conv
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2  # residual block j of a stage has dilation dilation_base ** j
    compress: int = 2  # residual branch width = channels // compress
    true_skip: bool = False  # identity shortcut; False = a 1x1 conv shortcut (EnCodec's models)
    n_q: int = 32
    bins: int = 1024
    decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 50
    expiry: ExpiryConfig = field(default_factory=lambda: ExpiryConfig(mode="upstream"))
    init_fix: bool | None = None  # k-means init stores means x counts in embed_avg; None = only in fixed mode
    quantizer_dropout: bool = False
    detach_residual: bool = False
    target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)  # kbps
    # "vqtorch": the peer arm (studylib.quantizers.peer), vector-quantize-pytorch's ResidualVQ with its own expiry at
    # expiry.threshold (absolute); the other expiry fields and init_fix do not apply to it.
    # "dac": DAC's factorized RVQ (studylib.quantizers.factorized); "simvq": the collapse-free peer
    # (studylib.quantizers.peer). Neither
    # has an expiry (expiry.mode "none"): expiry.threshold and decay define only their reported dead codes.
    quantizer: str = "ours"
    init: str = "pytorch"  # INITS; the CPU presets (small, tiny) start with "unit_gain"

    def __post_init__(self) -> None:
        # Lists are accepted for convenience but stored as tuples so the config stays hashable.
        object.__setattr__(self, "ratios", tuple(self.ratios))
        object.__setattr__(self, "target_bandwidths", tuple(self.target_bandwidths))
        for name in ("sample_rate", "channels", "n_filters", "dimension", "n_q", "kernel_size",
                     "last_kernel_size", "residual_kernel_size", "dilation_base", "compress"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}: got {value!r}, allowed an integer >= 1")
        for name in ("n_residual_layers", "lstm_layers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name}: got {value!r}, allowed an integer >= 0")
        for name in ("causal", "kmeans_init", "quantizer_dropout", "detach_residual", "true_skip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: got {getattr(self, name)!r}, allowed True or False")
        if not self.ratios or not all(_is_int(r) and r >= 1 for r in self.ratios):
            raise ValueError(f"ratios: got {self.ratios!r}, allowed a non-empty sequence of integers >= 1")
        if self.n_filters // self.compress < 1:
            raise ValueError(f"compress: got {self.compress}, allowed at most n_filters ({self.n_filters})")
        if self.norm not in NORMS:
            raise ValueError(f"norm: got {self.norm!r}, allowed {NORMS}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode: got {self.pad_mode!r}, allowed {PAD_MODES}")
        if not _is_int(self.bins) or self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"bins: got {self.bins!r}, allowed a power of 2 >= 2 (whole bits per code)")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 < self.decay < 1:
            raise ValueError(f"decay: got {self.decay!r}, allowed a number in (0, 1)")
        if self.kmeans_init and (not _is_int(self.kmeans_iters) or self.kmeans_iters < 1):
            raise ValueError(f"kmeans_iters: got {self.kmeans_iters!r}, allowed an integer >= 1")
        if self.init_fix is not None and not isinstance(self.init_fix, bool):
            raise ValueError(f"init_fix: got {self.init_fix!r}, allowed None, True or False")
        if not isinstance(self.expiry, ExpiryConfig):
            raise ValueError(f"expiry: got {self.expiry!r}, allowed an ExpiryConfig")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer: got {self.quantizer!r}, allowed {QUANTIZERS}")
        if self.init not in INITS:
            raise ValueError(f"init: got {self.init!r}, allowed {INITS}")
        if self.quantizer == "vqtorch" and self.expiry.threshold_kind != "absolute":
            raise ValueError("expiry: the vqtorch quantizer allows only an absolute threshold (its own expiry)")
        if self.quantizer not in EMA_QUANTIZERS:
            self._check_gradient_quantizer()
        per_q = self.bandwidth_per_quantizer
        bws = self.target_bandwidths
        # Each target must buy at least one level and at most n_q of them (EnCodec floors bw / per_q).
        if not bws or any(
            isinstance(b, bool) or not isinstance(b, (int, float)) or not per_q <= b <= self.n_q * per_q
            for b in bws
        ) or list(bws) != sorted(set(bws)):
            raise ValueError(
                f"target_bandwidths: got {bws!r}, allowed a non-empty increasing sequence of kbps in "
                f"[{per_q}, {self.n_q * per_q}] (one to n_q={self.n_q} levels of {per_q} kbps)"
            )

    def _check_gradient_quantizer(self) -> None:
        """One-line errors, in TrainConfig's key names, for the options that do not apply to dac / simvq."""
        expiry, q = self.expiry, self.quantizer
        if expiry.mode != "none":
            raise ValueError(f"expiry_mode: got {expiry.mode!r} with quantizer {q!r}, allowed 'none' (no expiry: its "
                             "codebook is learned by gradient; expiry_threshold sets its reported dead codes)")
        unused = {"expiry_threshold_kind": expiry.threshold_kind != "absolute", "expiry_every": expiry.every != 1,
                  "expiry_replaced_usage": expiry.replaced_usage is not None, "init_fix": self.init_fix is not None,
                  "detach_residual": q == "dac" and self.detach_residual}  # DAC's residual is not detached
        if names := [name for name, changed in unused.items() if changed]:
            raise ValueError(f"{', '.join(names)}: do not apply to quantizer {q!r}; leave them at their defaults")

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame."""
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        """Latent frames per second, rounded up as EnCodec does (75 Hz for 24 kHz / 320)."""
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def bandwidth_per_quantizer(self) -> float:
        """kbps of one RVQ level: log2(bins) bits per frame."""
        return nominal_kbps(1, self.bins, self.frame_rate)

    @classmethod
    def encodec_24khz(cls) -> CodecConfig:
        """EnCodec's official causal 24 kHz mono model (``EncodecModel.encodec_model_24khz``)."""
        return cls()

    @classmethod
    def small(cls) -> CodecConfig:
        """CPU-sized SEANet around the study's full quantizer (32 levels of K=1024, D=128), with a start
        that carries the signal (`init="unit_gain"`)."""
        return cls(n_filters=8, lstm_layers=1, init="unit_gain")

    @classmethod
    def tiny(cls) -> CodecConfig:
        """Smoke tests only: narrow network, 4 short-initialised levels."""
        return cls(n_filters=4, lstm_layers=1, dimension=32, n_q=4, kmeans_iters=5,
                   target_bandwidths=(1.5, 3.0), init="unit_gain")


# ------------------------------------------------------------------------------------- convolutions


def _reflect(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """F.pad(x, (left, right), "reflect") as slices, flips and one cat: the same values, and about half the
    time forward + backward on CPU (aten's reflection_pad1d backward was ~12 % of a small codec's step)."""
    parts = [x[..., 1 : left + 1].flip(-1)] if left else []
    parts.append(x)
    if right:
        parts.append(x[..., -right - 1 : -1].flip(-1))
    return torch.cat(parts, -1) if len(parts) > 1 else x


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad on the time axis; reflect padding wider than the signal zero-extends it first (EnCodec's)."""
    length = x.shape[-1]
    if mode == "reflect" and length <= max(left, right):
        # Reflection needs more samples than the padding; borrow zeros on the right, then cut them off.
        extra = max(left, right) - length + 1
        padded = _reflect(F.pad(x, (0, extra)), left, right)
        return padded[..., : padded.shape[-1] - extra]
    if mode == "reflect":
        return _reflect(x, left, right)
    return F.pad(x, (left, right), mode)


class _Kernel(nn.Module):
    """A conv kernel and bias, weight-normalised or plain, under EnCodec's parameter names.

    Initialised like the PyTorch module it stands for (`template`), so fresh models match upstream's
    distribution; with weight norm, ``weight_g`` starts at the norm of ``weight_v`` (as torch does).
    """

    def __init__(self, template: nn.Conv1d | nn.ConvTranspose1d, norm: str):
        super().__init__()
        self.stride = template.stride[0]
        self.kernel_size = template.kernel_size[0]
        self.weight_norm = norm == "weight_norm"
        weight = template.weight.detach()
        if self.weight_norm:
            self.weight_v = nn.Parameter(weight.clone())
            self.weight_g = nn.Parameter(torch.linalg.vector_norm(weight, dim=(1, 2), keepdim=True))
        else:
            self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(template.bias.detach().clone())

    def kernel(self) -> torch.Tensor:
        if self.weight_norm:
            # torch's fused weight-norm kernel (what torch.nn.utils.weight_norm calls, dim 0):
            # weight = g * v / |v|, with |v| over all but the first axis.
            return torch._weight_norm(self.weight_v, self.weight_g, 0)
        return self.weight


class StreamableConv1d(_Kernel):
    """Conv1d with EnCodec's padding rules: [B, C_in, T] -> [B, C_out, ceil(T / stride)].

    The kernel's reach minus the stride is padded (all on the left when causal, split with the extra
    sample on the left otherwise), plus right padding so the last window is full: that is what lets the
    decoder rebuild at least T samples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, *, causal: bool, pad_mode: str, norm: str):
        if stride > 1 and dilation > 1:  # EnCodec only warns; its padding arithmetic assumes one of them is 1
            raise ValueError(f"dilation: got {dilation} with stride {stride}, allowed 1 when stride > 1")
        super().__init__(nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation), norm)
        self.dilation = dilation
        self.causal = causal
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = (self.kernel_size - 1) * self.dilation - (self.stride - 1)
        extra = -x.shape[-1] % self.stride  # up to a whole number of strides
        if self.causal:
            left, right = padding, extra
        else:
            left, right = padding - padding // 2, padding // 2 + extra
        x = _pad1d(x, left, right, self.pad_mode)
        return F.conv1d(x, self.kernel(), self.bias, self.stride, dilation=self.dilation)


class StreamableConvTranspose1d(_Kernel):
    """ConvTranspose1d that trims EnCodec's fixed padding: [B, C_in, F] -> [B, C_out, F * stride].

    Causal: all of it from the right (EnCodec's trim_right_ratio=1). The encoder's extra padding is not
    undone here; `Codec` trims the output to the input length at the end.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, *,
                 causal: bool, norm: str):
        super().__init__(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride), norm)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.kernel(), self.bias, self.stride)  # [B, C_out, (F - 1) s + k]
        padding = self.kernel_size - self.stride
        left = 0 if self.causal else padding - padding // 2
        return y[..., left : y.shape[-1] - (padding - left)]


@torch.no_grad()
def unit_gain_init_(model: nn.Module) -> nn.Module:
    """Zero every conv bias and scale every kernel to variance 1 / fan_in, in place.

    Why: PyTorch draws conv kernels from kaiming_uniform(a=sqrt(5)), variance 1 / (3 fan_in), so each conv
    passes ~1/sqrt(3) of its input's scale on, and draws biases of the same size as a unit-scale signal's
    output. Through SEANet's 16 layers the input-dependent part shrinks ~230x by the latent while the
    biases add a constant that does not: every input gets the same latent, the first k-means sees one
    point repeated, and the decoder's output is the same for every input (measured: `recipe.signal_trace`).
    Multiplying the kernels by sqrt(3) (``weight_g`` under weight norm, so directions stay PyTorch's draw)
    and zeroing biases keeps the signal's scale from input to latent to output. The LSTMs keep PyTorch's
    init: their skip connection carries the signal past them.
    """
    for module in model.modules():
        if isinstance(module, _Kernel):
            module.bias.zero_()
            (module.weight_g if module.weight_norm else module.weight).mul_(math.sqrt(3))
    return model


# ------------------------------------------------------------------------------------------- blocks


class ResidualBlock(nn.Module):
    """SEANet residual block: x + ELU-conv(k, dilated)-ELU-conv(1) bottleneck. [B, C, T] -> [B, C, T]."""

    def __init__(self, config: CodecConfig, channels: int, dilation: int):
        super().__init__()
        conv = partial(StreamableConv1d, causal=config.causal, pad_mode=config.pad_mode, norm=config.norm)
        hidden = channels // config.compress
        # Module names (`block.1`, `block.3`, `shortcut`) are EnCodec's, for its state dicts.
        self.block = nn.Sequential(
            nn.ELU(),
            conv(channels, hidden, config.residual_kernel_size, dilation=dilation),
            nn.ELU(),
            conv(hidden, channels, 1),
        )
        self.shortcut = nn.Identity() if config.true_skip else conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SkipLSTM(nn.Module):
    """Multi-layer LSTM over time with a skip connection (EnCodec's SLSTM). [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, num_layers: int):
        super().__init__()
        self.lstm = nn.LSTM(channels, channels, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # [T, B, C]: nn.LSTM's default time-major layout
        y, _ = self.lstm(seq)
        return (y + seq).permute(1, 2, 0)


def _residual_stage(config: CodecConfig, channels: int) -> list[nn.Module]:
    return [ResidualBlock(config, channels, config.dilation_base**j) for j in range(config.n_residual_layers)]


class SEANetEncoder(nn.Module):
    """Waveform to latent: [B, C, T] -> [B, D, ceil(T / hop_length)].

    One `nn.Sequential` named `model`, in EnCodec's layer order, because its state-dict keys are
    indexed by that order (`encoder.model.13.lstm...`).
    """

    def __init__(self, config: CodecConfig):
        super().__init__()
        conv = partial(StreamableConv1d, causal=config.causal, pad_mode=config.pad_mode, norm=config.norm)
        width = config.n_filters
        layers: list[nn.Module] = [conv(config.channels, width, config.kernel_size)]
        for ratio in reversed(config.ratios):  # finest stride first
            layers += _residual_stage(config, width)
            layers += [nn.ELU(), conv(width, 2 * width, 2 * ratio, stride=ratio)]
            width *= 2
        if config.lstm_layers:
            layers.append(SkipLSTM(width, config.lstm_layers))
        layers += [nn.ELU(), conv(width, config.dimension, config.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(wav)


class SEANetDecoder(nn.Module):
    """Latent to waveform: [B, D, F] -> [B, C, F * hop_length]. Mirrors `SEANetEncoder` (no final
    activation, as EnCodec's models)."""

    def __init__(self, config: CodecConfig):
        super().__init__()
        conv = partial(StreamableConv1d, causal=config.causal, pad_mode=config.pad_mode, norm=config.norm)
        width = config.n_filters * 2 ** len(config.ratios)
        layers: list[nn.Module] = [conv(config.dimension, width, config.kernel_size)]
        if config.lstm_layers:
            layers.append(SkipLSTM(width, config.lstm_layers))
        for ratio in config.ratios:  # coarsest stride first
            layers += [
                nn.ELU(),
                StreamableConvTranspose1d(width, width // 2, 2 * ratio, ratio, causal=config.causal,
                                          norm=config.norm),
            ]
            width //= 2
            layers += _residual_stage(config, width)
        layers += [nn.ELU(), conv(width, config.channels, config.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model(latent)


# -------------------------------------------------------------------------------------------- codec


@dataclass
class CodecOutput:
    """What one `Codec.forward` produced; `penalty` goes into the loss, `metrics` into the logs."""

    audio: torch.Tensor  # [B, C, T], trimmed to the input length
    codes: torch.Tensor  # [n_q, B, F] int64
    bandwidth: torch.Tensor  # kbps actually used (scalar; random per batch under quantizer dropout)
    penalty: torch.Tensor | None  # mean commitment loss over levels (zero in eval mode)
    metrics: dict[str, torch.Tensor]  # the quantizer's per-level metrics (training mode only)


def encodec_state_dict_to_codec(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``encodec`` EncodecModel state dict to `Codec`'s keys.

    EnCodec nests each kernel two modules deep (``SConv1d.conv`` -> ``NormConv1d.conv`` -> Conv1d, and
    ``convtr.convtr`` for transposed convs); ours holds it directly, e.g.
    ``encoder.model.0.conv.conv.weight_g`` -> ``encoder.model.0.weight_g``. Every other key (LSTMs,
    ``quantizer.vq.layers.{i}._codebook.*``) is already the same.
    """
    return {key.replace(".conv.conv.", ".").replace(".convtr.convtr.", "."): value
            for key, value in state_dict.items()}


def full_precision(device_type: str) -> torch.autocast:
    """Autocast off: the quantizer works in float32 under mixed precision. Its codebooks are float32
    buffers, and bf16 distances would misrank near codes among K=1024."""
    return torch.autocast(device_type, enabled=False)


def _peer_quantizer(config: CodecConfig, generator: torch.Generator | None) -> nn.Module:
    """A peer arm's RVQ (vqtorch or simvq), imported only when asked for (vector-quantize-pytorch pulls in einx
    and loguru)."""
    try:
        from studylib.quantizers.peer import PeerResidualVQ, SimResidualVQ
    except ModuleNotFoundError as e:
        if e.name != "vector_quantize_pytorch":
            raise
        raise ImportError(f"quantizer={config.quantizer!r} needs vector-quantize-pytorch: "
                          "pip install vector-quantize-pytorch==1.32.0") from e
    if config.quantizer == "simvq":
        return SimResidualVQ(
            dimension=config.dimension, n_q=config.n_q, bins=config.bins, quantizer_dropout=config.quantizer_dropout,
            detach_residual=config.detach_residual, generator=generator, decay=config.decay,
            threshold=config.expiry.threshold,
        )
    return PeerResidualVQ(
        dimension=config.dimension, n_q=config.n_q, bins=config.bins, decay=config.decay,
        kmeans_init=config.kmeans_init, kmeans_iters=config.kmeans_iters,
        threshold_ema_dead_code=config.expiry.threshold, quantizer_dropout=config.quantizer_dropout,
        detach_residual=config.detach_residual, generator=generator,
    )


def build_quantizer(config: CodecConfig, generator: torch.Generator | None = None) -> nn.Module:
    """The RVQ that `config.quantizer` names: x [B, D, F] -> `QuantizedResult`, with encode / decode."""
    if config.quantizer in ("vqtorch", "simvq"):
        return _peer_quantizer(config, generator)
    if config.quantizer == "dac":
        return FactorizedResidualVQ(
            dimension=config.dimension, n_q=config.n_q, bins=config.bins, quantizer_dropout=config.quantizer_dropout,
            generator=generator, decay=config.decay, threshold=config.expiry.threshold,
            # the codec's init reaches DAC's quantizer too: "unit_gain" = a fresh quantizer passes the latent through
            init="unit_gain" if config.init == "unit_gain" else "dac",
        )
    return ResidualVectorQuantizer(
        dimension=config.dimension, n_q=config.n_q, bins=config.bins, decay=config.decay,
        kmeans_init=config.kmeans_init, kmeans_iters=config.kmeans_iters, expiry=config.expiry,
        quantizer_dropout=config.quantizer_dropout, detach_residual=config.detach_residual,
        generator=generator, init_fix=config.init_fix,
    )


class Codec(nn.Module):
    """SEANet encoder -> residual VQ (`build_quantizer`: ours, a peer arm, or DAC's) -> SEANet decoder.

    `generator` seeds the quantizer's random draws (k-means seeding, dead-code replacement, dropout, the initial
    parameters of dac / simvq); None uses the global RNG exactly as EnCodec does.
    """

    def __init__(self, config: CodecConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.encoder = SEANetEncoder(config)
        self.quantizer = build_quantizer(config, generator)
        self.decoder = SEANetDecoder(config)
        if config.init == "unit_gain":
            unit_gain_init_(self.encoder)
            unit_gain_init_(self.decoder)
        # compiled encoder / decoder forwards (`compile_networks`), kept in a plain dict so they are not submodules:
        # the state dict keeps the keys of the uncompiled codec
        self._compiled: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def compile_networks(self, **options) -> Codec:
        """torch.compile the encoder and decoder (`options` go to torch.compile), used by training-mode forwards
        only: evaluation and encode / decode stay eager, so validation does not recompile for eval mode or odd
        batch sizes. The quantizer stays eager: it has data-dependent control flow (k-means, expiry)."""
        self._compiled = {name: torch.compile(getattr(self, name), **options) for name in ("encoder", "decoder")}
        return self

    def _network(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._compiled[name] if self.training and name in self._compiled else getattr(self, name)

    @classmethod
    def from_encodec(cls, state_dict: Mapping[str, torch.Tensor], config: CodecConfig | None = None) -> Codec:
        """A codec holding an ``encodec`` model's weights and codebooks (default: the official 24 kHz
        configuration). Loaded strictly, so a config that does not match the checkpoint raises."""
        codec = cls(config if config is not None else CodecConfig.encodec_24khz())
        codec.load_state_dict(encodec_state_dict_to_codec(state_dict), strict=True)
        return codec

    def _check(self, wav: torch.Tensor, bandwidth: float | None) -> None:
        if wav.dim() != 3 or wav.shape[1] != self.config.channels:
            raise ValueError(f"wav: got shape {tuple(wav.shape)}, allowed [B, {self.config.channels}, T]")
        # EnCodec's set_target_bandwidth rule: only the bandwidths the model was trained for.
        if bandwidth is not None and bandwidth not in self.config.target_bandwidths:
            raise ValueError(f"bandwidth: got {bandwidth!r}, allowed None or one of "
                             f"{self.config.target_bandwidths}")

    def forward(self, wav: torch.Tensor, bandwidth: float | None = None, quantize: bool = True) -> CodecOutput:
        """Encode, quantize (training: straight-through, EMA update, expiry) and decode.
        wav [B, C, T]; bandwidth None = all n_q levels; quantize=False: the decoder gets the latent itself
        (an autoencoder step: no codes, no penalty, codebooks untouched)."""
        self._check(wav, bandwidth)
        latent = self._network("encoder")(wav).float()  # [B, D, F]
        if not quantize:
            audio = self._network("decoder")(latent)[..., : wav.shape[-1]].float()
            no_codes = torch.zeros(0, *latent.shape[::2], dtype=torch.long, device=wav.device)  # [0, B, F]
            return CodecOutput(audio, no_codes, latent.new_zeros(()), latent.new_zeros(()), {})
        with full_precision(wav.device.type):
            q = self.quantizer(latent, self.config.frame_rate, bandwidth)
        audio = self._network("decoder")(q.quantized)[..., : wav.shape[-1]].float()  # [B, C, F * hop] -> [B, C, T]
        return CodecOutput(audio, q.codes, q.bandwidth, q.penalty, q.metrics)

    def encode(self, wav: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
        """wav [B, C, T] -> codes [n_q(bandwidth), B, ceil(T / hop_length)]."""
        self._check(wav, bandwidth)
        latent = self.encoder(wav).float()  # [B, D, F]
        with full_precision(wav.device.type):
            return self.quantizer.encode(latent, self.config.frame_rate, bandwidth)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n_q, B, F] -> wav [B, C, F * hop_length] (trim to the original length yourself)."""
        return self.decoder(self.quantizer.decode(codes))
