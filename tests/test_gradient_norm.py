"""Gradient regularization: finite differences against double backward, the dense reference, the wrapper."""

from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
from cases import make_case
from helpers import assert_unchanged, full_data_closure, reference, rel_err, snapshot
from torch import nn

from curvature.optim import SAM
from curvature.regularizers import GradientRegularization, gradient_norm_penalty

F64 = torch.float64


X = torch.randn(32, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))


def loss_of(model: nn.Module) -> Callable[[], torch.Tensor]:
    dtype = next(model.parameters()).dtype
    return lambda: nn.functional.cross_entropy(model(X.to(dtype)), Y)


def problem(seed: int = 0, dtype: torch.dtype = F64) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    return model, loss_of(model)


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_exact_method_equals_dense_reference(case_name: str) -> None:
    """g + γ H g with the dense float64 Hessian of the registry case."""
    case = make_case(case_name, F64)
    params = [p for p in case["model"].parameters() if p.requires_grad]
    closure = full_data_closure(case)
    g = flat(list(torch.autograd.grad(closure(), params, allow_unused=True)))  # every case uses every parameter
    truth = g + 0.3 * reference("hessian", case_name) @ g
    assert rel_err(flat(gradient_norm_penalty(closure, params, gamma=0.3, method="exact")), truth) < 1e-10


def test_finite_differences_converge_at_their_order() -> None:
    """Halving h halves the forward and backward errors (O(h)) and quarters the central error (O(h²))."""
    model, closure = problem()
    params = list(model.parameters())
    exact = flat(gradient_norm_penalty(closure, params, gamma=0.5, method="exact"))
    steps = [4e-2, 2e-2, 1e-2, 5e-3]
    for method, order in (("forward", 1), ("backward", 1), ("central", 2)):
        errors = [float((flat(gradient_norm_penalty(closure, params, 0.5, method, h=h)) - exact).norm())
                  for h in steps]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(abs(math.log2(r) - order) < 0.1 for r in ratios), (method, errors, ratios)
    assert errors[-1] < 1e-6 * float(exact.norm())  # central at h = 5e-3


def test_forward_difference_with_gamma_equal_to_the_step_is_sam() -> None:
    """With γ = ε = h/‖g‖ the forward difference is ∇L(θ + h g/‖g‖), SAM's gradient (Karakida et al. 2023)."""
    model, closure = problem()
    params = list(model.parameters())
    g = flat(list(torch.autograd.grad(closure(), params)))
    h = 0.05
    fd = gradient_norm_penalty(closure, params, gamma=h / float(g.norm()), method="forward", h=h)
    twin = copy.deepcopy(model)
    SAM(twin.parameters(), torch.optim.SGD, rho=h, lr=0.0).step(loss_of(twin))
    assert rel_err(flat(fd), flat([p.grad for p in twin.parameters()])) < 1e-10


@pytest.mark.parametrize("method, calls", [("forward", 2), ("backward", 2), ("central", 3), ("exact", 1)])
def test_parameters_restored_closure_calls_and_accumulation(method: str, calls: int) -> None:
    model, closure = problem()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    count = {"n": 0}

    def counted() -> torch.Tensor:
        count["n"] += 1
        return closure()

    grads = gradient_norm_penalty(counted, params, gamma=0.1, method=method)
    assert count["n"] == calls
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    again = gradient_norm_penalty(closure, params, gamma=0.1, method=method, accumulate=True)
    for p, g, a in zip(params, grads, again):
        assert torch.equal(g, a) and torch.equal(p.grad, 1 + g)


def test_zero_gamma_is_the_plain_gradient_and_frozen_parameters_are_skipped() -> None:
    model, closure = problem()
    model[0].bias.requires_grad_(False)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    plain = torch.autograd.grad(closure(), trainable)
    grads = gradient_norm_penalty(closure, params, gamma=0.0)
    assert len(grads) == len(trainable) and all(torch.equal(a, b) for a, b in zip(grads, plain))


def test_float32_forward_difference_is_close_to_exact() -> None:
    model, closure = problem(dtype=torch.float32)
    params = list(model.parameters())
    exact = flat(gradient_norm_penalty(closure, params, gamma=0.5, method="exact"))
    forward = flat(gradient_norm_penalty(closure, params, gamma=0.5, method="central", h=1e-2))
    assert forward.dtype == torch.float32 and rel_err(forward, exact) < 1e-3


def test_wrapper_steps_the_base_optimizer_with_the_penalized_gradient() -> None:
    model, closure = problem()
    twin = copy.deepcopy(model)
    twin_loss = loss_of(twin)

    optimizer = GradientRegularization(model.parameters(), torch.optim.SGD, gamma=0.2, method="central", lr=0.1,
                                       momentum=0.9)
    reference_sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        start = closure().item()
        assert optimizer.step(closure).item() == start
        grads = gradient_norm_penalty(twin_loss, list(twin.parameters()), gamma=0.2, method="central")
        for p, g in zip(twin.parameters(), grads):
            p.grad = g
        reference_sgd.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
    state = optimizer.state_dict()
    assert state["param_groups"][0]["gamma"] == 0.2 and len(state["state"]) == 4
    restored = GradientRegularization(twin.parameters(), torch.optim.SGD, gamma=0.2, method="central", lr=0.1)
    restored.load_state_dict(copy.deepcopy(state))
    optimizer.step(closure)
    restored.step(twin_loss)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_non_finite_values_leave_parameters_unchanged() -> None:
    model, closure = problem()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    calls = {"n": 0}

    def blows_up_away_from_start() -> torch.Tensor:
        calls["n"] += 1
        return closure() * (1.0 if calls["n"] == 1 else float("nan"))

    with pytest.raises(ValueError, match="finite-difference point"):
        gradient_norm_penalty(blows_up_away_from_start, params, gamma=0.1)
    with pytest.raises(ValueError, match="not finite"):
        gradient_norm_penalty(lambda: closure() * float("inf"), params, gamma=0.1)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_argument_errors() -> None:
    model, closure = problem()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="method must be one of"):
        gradient_norm_penalty(closure, params, 0.1, method="sideways")
    with pytest.raises(ValueError, match="h must be positive"):
        gradient_norm_penalty(closure, params, 0.1, h=0.0)
    with pytest.raises(ValueError, match="gamma must be non-negative"):
        gradient_norm_penalty(closure, params, -0.1)
    with pytest.raises(TypeError, match="iterable of tensors"):
        gradient_norm_penalty(closure, model[0].weight, 0.1)
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        gradient_norm_penalty(closure, [], 0.1)
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        gradient_norm_penalty(closure, params, 0.1, accumulate=1)
    with pytest.raises(ValueError, match="do not call backward"):
        gradient_norm_penalty(lambda: closure().detach(), params, 0.1)
    with pytest.raises(ValueError, match="same gamma"):
        GradientRegularization([{"params": model[0].parameters(), "gamma": 0.5}, {"params": model[2].parameters()}],
                               torch.optim.SGD, gamma=0.1, lr=0.1)


# -- modes without autograd, closures that call backward, losses that use none of the parameters -----------


@pytest.mark.parametrize("method", ["forward", "backward", "central", "exact"])
def test_penalty_under_inference_mode_is_the_one_computed_outside_it(method: str) -> None:
    model, closure = problem()
    params = list(model.parameters())
    expected = gradient_norm_penalty(closure, params, gamma=0.3, method=method)
    for p in params:
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    with torch.inference_mode():
        got = gradient_norm_penalty(closure, params, gamma=0.3, method=method)
    assert all(torch.equal(a, b) and not a.is_inference() for a, b in zip(got, expected))
    assert_unchanged(model, before)
    with torch.inference_mode():
        gradient_norm_penalty(closure, params, gamma=0.3, method=method, accumulate=True)
    for p, g in zip(params, expected):
        assert torch.equal(p.grad, 1 + g) and not p.grad.is_inference()


def test_wrapper_under_inference_mode_is_the_step_taken_outside_it() -> None:
    model, closure = problem()
    twin = copy.deepcopy(model)
    options = dict(gamma=0.2, method="central", lr=0.1, momentum=0.9)
    inside = GradientRegularization(model.parameters(), torch.optim.SGD, **options)
    outside = GradientRegularization(twin.parameters(), torch.optim.SGD, **options)
    for step in range(3):  # two steps under inference mode, then one outside it on the momentum they kept
        with torch.inference_mode(step < 2):
            loss = inside.step(closure)
        assert torch.equal(loss, outside.step(loss_of(twin))) and not loss.is_inference()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b) and torch.equal(a.grad, b.grad) and not a.is_inference()
        for a, b in zip(inside.state_dict()["state"].values(), outside.state_dict()["state"].values()):
            assert torch.equal(a["momentum_buffer"], b["momentum_buffer"]) and not a["momentum_buffer"].is_inference()


def test_a_closure_that_calls_backward_is_refused_with_parameters_unchanged() -> None:
    model, closure = problem()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]

    def lbfgs_style() -> torch.Tensor:
        model.zero_grad()
        loss = closure()
        loss.backward()
        return loss

    optimizer = GradientRegularization(params, torch.optim.SGD, gamma=0.1, lr=0.1, momentum=0.9)
    for method in ("forward", "exact"):
        with pytest.raises(ValueError, match="must compute the loss and return it without calling backward"):
            gradient_norm_penalty(lbfgs_style, params, gamma=0.1, method=method)
    with pytest.raises(ValueError, match="must compute the loss and return it without calling backward"):
        optimizer.step(lbfgs_style)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not optimizer.state_dict()["state"]  # the base optimizer never stepped


def test_a_loss_that_uses_none_of_the_parameters_is_refused_and_a_linear_one_is_not() -> None:
    model, closure = problem()
    other = copy.deepcopy(model)  # the parameters of a copy: the loss does not use them
    params = list(other.parameters())
    for method in ("forward", "exact"):
        with pytest.raises(ValueError, match="does not depend on any of params; pass the parameters it is computed"):
            gradient_norm_penalty(closure, params, gamma=0.1, method=method)
    with pytest.raises(ValueError, match="does not depend on any of params"):
        GradientRegularization(params, torch.optim.SGD, gamma=0.1, lr=0.1).step(closure)
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(params, model.parameters()))
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)  # linear: H = 0, so g + γ H g = g
    for method in ("forward", "exact"):
        got = gradient_norm_penalty(lambda: w @ torch.tensor([3.0, 4.0], dtype=F64), [w], 0.5, method=method)
        assert torch.equal(got[0], torch.tensor([3.0, 4.0], dtype=F64))
