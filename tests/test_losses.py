"""The loss balancer (EnCodec paper section 3.4, AudioCraft's balancer) and the SI-SDR loss term."""

from __future__ import annotations

import pytest
import torch

from studylib.model import metrics
from studylib.model.losses import Balancer, neg_si_sdr


def toy(seed: int = 0):
    """A linear 'codec' y = W x on a batch of 4 items, and a target."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Conv1d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=g))
    x, target = torch.randn(4, 1, 64, generator=g), torch.randn(4, 1, 64, generator=g)
    return model, x, target


def term_losses(y: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"l1": (y - target).abs().mean(), "l2": (y - target).pow(2).mean() * 50}


def grad_after(balancer: Balancer, losses_fn, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    model, x, target = toy(seed)
    y = model(x)
    effective = balancer.backward(losses_fn(y, target), y)
    return model.weight.grad.clone(), effective


def test_gradient_is_the_hand_computed_balanced_sum():
    weights = {"l1": 0.1, "l2": 2.0}
    got, effective = grad_after(Balancer(weights, total_norm=1.0), term_losses)

    model, x, target = toy()
    y = model(x)
    losses = term_losses(y, target)
    out_grad = torch.zeros_like(y)
    expected_effective = 0.0
    for name, loss in losses.items():
        (g,) = torch.autograd.grad(loss, y, retain_graph=True)
        norm = g.flatten(1).norm(dim=1).mean()  # per batch item, averaged
        scale = weights[name] / sum(weights.values()) / norm
        out_grad += scale * g
        expected_effective += float(scale * loss.detach())
    (expected,) = torch.autograd.grad(y, model.weight, out_grad)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert effective.item() == pytest.approx(expected_effective, rel=1e-6)
    assert not effective.requires_grad


def test_zero_weight_removes_the_term():
    with_zero, _ = grad_after(Balancer({"l1": 1.0, "l2": 0.0}), term_losses)
    alone, _ = grad_after(Balancer({"l1": 1.0}), lambda y, t: {"l1": term_losses(y, t)["l1"]})
    torch.testing.assert_close(with_zero, alone, rtol=0, atol=0)


def test_doubling_a_loss_leaves_the_balanced_gradient_unchanged():
    once, _ = grad_after(Balancer({"l1": 0.1, "l2": 2.0}), term_losses)
    doubled, _ = grad_after(Balancer({"l1": 0.1, "l2": 2.0}),
                            lambda y, t: {k: v * (2 if k == "l2" else 1) for k, v in term_losses(y, t).items()})
    torch.testing.assert_close(once, doubled, rtol=1e-6, atol=0)
    raw_once, _ = grad_after(Balancer({"l1": 0.1, "l2": 2.0}, balance_grads=False), term_losses)
    raw_doubled, _ = grad_after(Balancer({"l1": 0.1, "l2": 2.0}, balance_grads=False),
                                lambda y, t: {k: v * (2 if k == "l2" else 1) for k, v in term_losses(y, t).items()})
    assert not torch.allclose(raw_once, raw_doubled)  # a raw sum does change: the balancer is what removes it


def test_unbalanced_is_the_plain_weighted_sum():
    got, _ = grad_after(Balancer({"l1": 0.1, "l2": 2.0}, balance_grads=False), term_losses)
    model, x, target = toy()
    losses = term_losses(model(x), target)
    (0.1 * losses["l1"] + 2.0 * losses["l2"]).backward()
    torch.testing.assert_close(got, model.weight.grad, rtol=1e-6, atol=0)


def test_ema_of_norms_starts_unbiased():
    balancer = Balancer({"l1": 1.0}, ema_decay=0.9)
    norms = []
    for seed in (0, 1):
        model, x, target = toy(seed)
        y = model(x)
        loss = (y - target).abs().mean()
        (g,) = torch.autograd.grad(loss, y, retain_graph=True)
        norms.append(float(g.flatten(1).norm(dim=1).mean()))
        balancer.backward({"l1": loss}, y)
        avg = float(balancer.averager.total["l1"] / balancer.averager.weight["l1"])
        if seed == 0:
            assert avg == pytest.approx(norms[0], rel=1e-6)  # the first value, not (1 - decay) x it
        else:
            assert avg == pytest.approx((0.9 * norms[0] + norms[1]) / 1.9, rel=1e-6)


def test_extra_loss_goes_through_the_same_backward_unscaled():
    model, x, target = toy()
    y = model(x)
    extra = model.weight.pow(2).sum()
    Balancer({"l1": 1.0}).backward({"l1": (y - target).abs().mean()}, y, extra=extra)
    with_extra = model.weight.grad.clone()
    without, _ = grad_after(Balancer({"l1": 1.0}), lambda y, t: {"l1": (y - t).abs().mean()})
    torch.testing.assert_close(with_extra - without, 2 * model.weight.detach(), rtol=1e-5, atol=1e-6)


def test_state_round_trip_balances_identically():
    a = Balancer({"l1": 0.1, "l2": 2.0})
    grad_after(a, term_losses, seed=0)
    b = Balancer({"l1": 0.1, "l2": 2.0})
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(grad_after(a, term_losses, seed=1)[0], grad_after(b, term_losses, seed=1)[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [
    ({"weights": {}}, "weights"), ({"weights": {"l1": -1.0}}, "weights"),
    ({"weights": {"l1": 1.0}, "total_norm": 0.0}, "total_norm"),
    ({"weights": {"l1": 1.0}, "ema_decay": 1.0}, "ema_decay"),
])
def test_bad_arguments_name_themselves(bad, message):
    with pytest.raises(ValueError, match=message):
        Balancer(**bad)


def test_loss_without_weight_is_an_error():
    model, x, target = toy()
    y = model(x)
    with pytest.raises(ValueError, match="no weight"):
        Balancer({"l1": 1.0}).backward(term_losses(y, target), y)


def test_neg_si_sdr_matches_the_metric():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 1, 2400, generator=g)
    est = 0.5 * ref + 0.1 * torch.randn(3, 1, 2400, generator=g)
    expected = -metrics.si_sdr(est[:, 0].double(), ref[:, 0].double()).mean()
    assert neg_si_sdr(est, ref).item() == pytest.approx(expected.item(), abs=1e-4)
    assert neg_si_sdr(3 * est, ref).item() == pytest.approx(neg_si_sdr(est, ref).item(), abs=1e-4)  # gain-free
