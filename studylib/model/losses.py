"""Reconstruction losses of the codec (EnCodec's, without the adversarial terms at CPU scale)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from studylib.core import distributed
from studylib.model.codec import SAMPLE_RATE


class MultiScaleMelLoss(nn.Module):
    """Multi-scale mel loss over window sizes 2^5..2^11 (EnCodec's scales; hop = window / 4, 64 bands):
    mean over scales of L1 between mel magnitudes plus L1 between log10 mels (DAC's form of the second
    term, in place of EnCodec's L2 on magnitudes, which the loudest bins dominate).

    The value is torchaudio's ``MelSpectrogram`` (periodic Hann window, centred STFT with reflect padding,
    magnitudes, HTK mel filters without norm); `autograd_loss` computes it that way, through autograd. The
    forward used in training (`_MelLoss`) gives the same value to float rounding and takes its gradient in
    the same pass, by hand, so that backward is one multiplication. Why: the loss was ~20 % of the cpu
    recipe's step on one core, mostly small FFTs, their backward (a full complex FFT per scale), complex
    abs and its sign, and autograd's bookkeeping (torch.profiler, 2026-12-03). What it does instead:

    * the gradient of the STFT by its adjoint: ``n * irfft`` with the inner bins halved, overlap-added by
      ``F.fold``, the reflect padding folded back;
    * the estimate and the reference framed and transformed in one batch;
    * mel bands that cover no FFT bin (36 of 64 at window 32) skipped: they are zero on both sides and add
      exactly 0 to every sum (the means still divide by all 64 bands).

    tests/test_losses.py checks value and gradient against `autograd_loss` and the gradient by gradcheck.
    The loss computes in float32 even under autocast (torch.fft has no bfloat16 kernels on CPU, and a bf16
    DFT would misstate the spectra by ~0.4 %)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, scales: tuple[int, ...] = tuple(range(5, 12)), n_mels: int = 64):
        super().__init__()
        self.windows = tuple(2**i for i in scales)
        self.n_mels = n_mels
        for n in self.windows:
            with warnings.catch_warnings():  # small windows leave some low bands empty: we drop those
                warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
                fb = torchaudio.functional.melscale_fbanks(n // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate)
            self.register_buffer(f"filters_{n}", fb[:, fb.sum(0) > 0].contiguous(), persistent=False)  # [F, M']
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        est = estimate.float().reshape(-1, estimate.shape[-1])  # [B * C, T]
        ref = reference.float().reshape(-1, reference.shape[-1]).detach()
        with torch.autocast(est.device.type, enabled=False):
            return _MelLoss.apply(est, ref, self)

    # ----------------------------------------------------------------------------- the reference form

    def _mel(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [N, T] -> mel magnitudes of the non-empty bands [N, frames, M'] (torch.stft, autograd)."""
        spec = torch.stft(x, n, n // 4, n, getattr(self, f"window_{n}"), center=True, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True).abs()  # [N, F, frames]
        return spec.transpose(1, 2) @ getattr(self, f"filters_{n}")

    def autograd_loss(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The same loss through torch.stft and autograd: the definition `forward` is tested against."""
        est = estimate.float().reshape(-1, estimate.shape[-1])
        ref = reference.float().reshape(-1, reference.shape[-1])
        total = est.new_zeros(())
        for n in self.windows:
            s_est = self._mel(est, n)
            with torch.no_grad():
                s_ref = self._mel(ref, n)
            count = s_est.shape[0] * s_est.shape[1] * self.n_mels  # the mean over all bands, empty ones included
            log_diff = torch.log10(s_est.clamp_min(1e-5)) - torch.log10(s_ref.clamp_min(1e-5))
            total = total + ((s_est - s_ref).abs().sum() + log_diff.abs().sum()) / count
        return total / len(self.windows)

    # ---------------------------------------------------------------- value and gradient in one pass

    def _spectrum(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, T] -> (Re, Im) of the centred, windowed STFT, each [N, frames, n / 2 + 1]."""
        p = n // 2
        frames = F.pad(x[:, None], (p, p), mode="reflect")[:, 0].unfold(-1, n, n // 4)  # [N, frames, n]
        z = torch.fft.rfft(frames * getattr(self, f"window_{n}"), dim=-1)
        return z.real, z.imag

    def _frames_adjoint(self, d_re: torch.Tensor, d_im: torch.Tensor, n: int, length: int) -> torch.Tensor:
        """The gradient of `_spectrum` by hand: (dRe, dIm) [N, frames, n / 2 + 1] -> d x [N, T]."""
        # rfft's adjoint: d x_t = Re sum_k G_k e^{2 pi i k t / n} = n irfft(G') with the inner bins of G' halved
        # (irfft counts each of them twice, as its conjugate twin); DC's and Nyquist's Im drop out, as they should.
        g = torch.complex(d_re, d_im)
        g[..., 1 : n // 2] *= 0.5
        d_frames = torch.fft.irfft(g, n, dim=-1) * (n * getattr(self, f"window_{n}"))  # [N, frames, n]
        p, hop = n // 2, n // 4
        padded = F.fold(d_frames.transpose(1, 2), (1, length + 2 * p), (1, n), stride=(1, hop))[:, 0, 0]
        # the reflect padding's adjoint: each padded sample sends its gradient back to the sample it mirrors
        d_x = padded[:, p : p + length].clone()
        d_x[:, 1 : p + 1] += padded[:, :p].flip(-1)
        d_x[:, length - 1 - p : length - 1] += padded[:, p + length :].flip(-1)
        return d_x

    def value_and_grad(self, est: torch.Tensor, ref: torch.Tensor, grad: bool) -> tuple[torch.Tensor,
                                                                                       torch.Tensor | None]:
        """The loss of est [N, T] against ref [N, T] and, if `grad`, its gradient w.r.t. est [N, T]."""
        n_items, length = est.shape
        total, d_est = est.new_zeros(()), torch.zeros_like(est) if grad else None
        for n in self.windows:
            filters = getattr(self, f"filters_{n}")
            re, im = self._spectrum(torch.cat([est, ref]), n)  # [2N, frames, bins]
            mag = torch.sqrt(re * re + im * im)
            mel_est, mel_ref = (mag @ filters).split(n_items)  # [N, frames, M']
            count = mel_est.shape[0] * mel_est.shape[1] * self.n_mels
            diff = mel_est - mel_ref
            log_est = mel_est.clamp_min(1e-5)
            log_diff = torch.log10(log_est) - torch.log10(mel_ref.clamp_min(1e-5))
            total += (diff.abs().sum() + log_diff.abs().sum()) / count
            if grad:  # d/d mel_est of |diff| + |log_diff| (torch's conventions: sign(0) = 0, clamp's mask >=)
                d_mel = diff.sign_() + log_diff.sign_() * (mel_est >= 1e-5) / (log_est * math.log(10))
                d_mag = (d_mel / (count * len(self.windows))) @ filters.T  # [N, frames, bins]
                mag = mag[:n_items]
                scale = torch.where(mag > 0, d_mag / mag, 0.0)  # |z|' = z / |z|, 0 at 0 (complex abs)
                d_est += self._frames_adjoint(scale * re[:n_items], scale * im[:n_items], n, length)
        return total / len(self.windows), d_est


class _MelLoss(torch.autograd.Function):
    """`MultiScaleMelLoss.value_and_grad` as an autograd node: forward keeps the gradient, backward scales it."""

    @staticmethod
    def forward(ctx, est: torch.Tensor, ref: torch.Tensor, loss: MultiScaleMelLoss) -> torch.Tensor:
        value, grad = loss.value_and_grad(est, ref, grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def neg_si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over items of -SI-SDR in dB, [B, C, T] -> scalar: a waveform term that ignores gain.

    Differentiable twin of `studylib.model.metrics.si_sdr` (which is float64 and eps-per-dtype for scoring)."""
    est = estimate.float() - estimate.float().mean(-1, keepdim=True)
    ref = reference.float() - reference.float().mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    ratio = (target.pow(2).sum(-1) + eps) / ((target - est).pow(2).sum(-1) + eps)
    return -(10 * torch.log10(ratio)).mean()


class _UnbiasedEMA:
    """EMA with bias correction: total / weight, both decayed, so the first value is returned as it is."""

    def __init__(self, decay: float):
        self.decay = decay
        self.total: dict[str, torch.Tensor] = {}
        self.weight: dict[str, float] = {}

    def __call__(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, value in values.items():
            self.total[name] = self.decay * self.total.get(name, 0.0) + value.detach()
            self.weight[name] = self.decay * self.weight.get(name, 0.0) + 1.0
        return {name: self.total[name] / self.weight[name] for name in values}

    def state_dict(self) -> dict:
        return {"total": dict(self.total), "weight": dict(self.weight)}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.weight = dict(state["total"]), dict(state["weight"])


class Balancer:
    """EnCodec's loss balancer (paper section 3.4; AudioCraft's `losses/balancer.py`), our own code.

    Each loss l_i is differentiated w.r.t. the model output y alone (g_i = dl_i/dy). Its norm (per batch
    item, then averaged, with `per_batch_item`) is tracked by a bias-corrected EMA, averaged over ranks
    under DDP, and the gradient sent into the model is

        sum_i  total_norm * w_i / sum_j w_j * g_i / (eps + ema ||g_i||)

    so a weight is the share of the gradient at the output, whatever the loss's scale. One backward
    pass through the model carries it, together with `extra` losses outside the balancer (EnCodec's
    commitment penalty). With `balance_grads=False` it is the plain weighted sum, w_i * g_i.
    """

    def __init__(self, weights: dict[str, float], total_norm: float = 1.0, ema_decay: float = 0.999,
                 per_batch_item: bool = True, balance_grads: bool = True, epsilon: float = 1e-12):
        if not weights or any(not w >= 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"weights: got {weights!r}, allowed non-negative numbers with a positive sum")
        if not total_norm > 0:
            raise ValueError(f"total_norm: got {total_norm!r}, allowed a number > 0")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay: got {ema_decay!r}, allowed a number in [0, 1)")
        self.weights = dict(weights)
        self.total_norm = total_norm
        self.per_batch_item = per_batch_item
        self.balance_grads = balance_grads
        self.epsilon = epsilon
        self.averager = _UnbiasedEMA(ema_decay)
        self.metrics: dict[str, float] = {}  # last call: each loss's share of the summed gradient norms at the output

    def state_dict(self) -> dict:
        """The norms' EMA, for checkpoints (a resumed run balances exactly as an uninterrupted one)."""
        return self.averager.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averager.load_state_dict(state)

    def backward(self, losses: dict[str, torch.Tensor], output: torch.Tensor,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
        """Backpropagate the balanced losses (and `extra`, unbalanced) in one pass; returns the effective
        loss sum_i scale_i * l_i (+ extra), detached."""

        unknown = set(losses) - set(self.weights)
        if unknown:
            raise ValueError(f"losses: {sorted(unknown)} have no weight; weighted: {sorted(self.weights)}")
        active = {name: loss for name, loss in losses.items() if self.weights[name] > 0}  # zero weight: no term
        grads, norms = {}, {}
        for name, loss in active.items():
            (grad,) = torch.autograd.grad(loss, [output], retain_graph=True)
            grads[name] = grad
            if self.per_batch_item:
                norms[name] = torch.linalg.vector_norm(grad.flatten(1), dim=1).mean()
            else:
                norms[name] = torch.linalg.vector_norm(grad)
        if distributed.is_distributed() and norms:  # every rank scales by the same averaged norms
            stacked = torch.stack(list(norms.values())).float()
            distributed.all_reduce_sum_(stacked).div_(distributed.world_size())
            norms = dict(zip(norms, stacked))
        avg = self.averager(norms)
        total_weight = sum(self.weights[name] for name in active)
        out_grad = torch.zeros_like(output)
        effective = output.new_zeros((), dtype=torch.float32)
        total_avg = sum(avg.values()) if avg else 0.0
        self.metrics = {}
        for name, grad in grads.items():
            if self.balance_grads:
                scale = self.weights[name] / total_weight * self.total_norm / (self.epsilon + avg[name])
            else:
                scale = torch.as_tensor(self.weights[name])
            out_grad.add_(grad * scale)
            effective = effective + scale * active[name].detach().float()
            self.metrics[name] = float(avg[name] / total_avg) if total_avg else 0.0
        tensors, grad_tensors = [output], [out_grad]
        if extra is not None:
            if extra.requires_grad:  # a constant extra (no quantizer in the step) has nothing to send back
                tensors.append(extra)
                grad_tensors.append(torch.ones_like(extra))
            effective = effective + extra.detach().float()
        torch.autograd.backward(tensors, grad_tensors)
        return effective.detach()
