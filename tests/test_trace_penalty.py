"""The differentiable Hutchinson trace penalty against dense float64 definitions."""

from __future__ import annotations

import math

import pytest
import torch
from cases import make_case
from helpers import assert_unchanged, full_data_closure, reference, rel_err, seeded, snapshot
from torch import nn
from torch.func import functional_call, grad, hessian

import curvature
from curvature.regularizers import hessian_trace_penalty
from curvature.sampling import probes

F64 = torch.float64


def same_probes(size: int, num_samples: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """The probe block hessian_trace_penalty draws from a generator seeded with ``seed``."""
    return probes("rademacher", (size, num_samples), seeded(seed), dtype, torch.device("cpu"))


def test_equals_the_dense_quadratic_forms_with_the_same_probes(case_name: str) -> None:
    case = make_case(case_name, F64)
    params = [p for p in case["model"].parameters() if p.requires_grad]
    H = reference("hessian", case_name)
    V = same_probes(H.shape[0], 3, seed=4)
    truth = float(torch.einsum("pi,pq,qi->", V, H, V)) / 3
    value = hessian_trace_penalty(full_data_closure(case)(), params, num_samples=3, generator=seeded(4))
    assert value.item() == pytest.approx(truth, rel=1e-10, abs=1e-12 * float(H.abs().max()))


def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))


def test_gradient_equals_the_third_derivative_of_the_dense_definition() -> None:
    """∇_θ (1/m) Σ vᵢᵀ H(θ) vᵢ by torch.func (hessian inside grad), against autograd through the penalty."""
    model, x, y = tiny()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    V = same_probes(theta.numel(), 2, seed=7)

    def loss(flat_theta: torch.Tensor) -> torch.Tensor:
        chunks = flat_theta.split([s.numel() for s in shapes])
        state = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return nn.functional.cross_entropy(functional_call(model, state, (x,)), y)

    def dense_penalty(flat_theta: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pi,pq,qi->", V, hessian(loss)(flat_theta), V) / 2

    truth = grad(dense_penalty)(theta)
    penalty = hessian_trace_penalty(nn.functional.cross_entropy(model(x), y), model.parameters(), num_samples=2,
                                    generator=seeded(7))
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(penalty, list(model.parameters()))])
    assert rel_err(got, truth) < 1e-10


def test_unbiased_within_its_standard_error() -> None:
    """Var(vᵀHv) = 2 (‖H‖_F² − Σ H_ii²) for Rademacher v; the mean of 400 samples lies within 4 standard errors."""
    case = make_case("mlp_tanh_ce_mean", F64)
    H = reference("hessian", "mlp_tanh_ce_mean")
    params = [p for p in case["model"].parameters() if p.requires_grad]
    m = 400
    value = hessian_trace_penalty(full_data_closure(case)(), params, num_samples=m, generator=seeded(0))
    std_error = math.sqrt(2 * (float((H**2).sum()) - float((torch.diagonal(H) ** 2).sum())) / m)
    assert abs(value.item() - float(torch.trace(H))) < 4 * std_error


def test_randomness_comes_from_the_generator_only() -> None:
    model, x, y = tiny()
    state = torch.get_rng_state()
    a = hessian_trace_penalty(nn.functional.cross_entropy(model(x), y), model.parameters(), 2)
    b = hessian_trace_penalty(nn.functional.cross_entropy(model(x), y), model.parameters(), 2)
    assert torch.equal(torch.get_rng_state(), state) and a.item() == b.item()
    c = hessian_trace_penalty(nn.functional.cross_entropy(model(x), y), model.parameters(), 2, seeded(3))
    d = hessian_trace_penalty(nn.functional.cross_entropy(model(x), y), model.parameters(), 2, seeded(3))
    assert c.item() == d.item()


def test_linear_loss_has_zero_trace_and_float32_runs() -> None:
    w = torch.randn(4, dtype=F64, requires_grad=True)
    penalty = hessian_trace_penalty((3 * w).sum(), [w], generator=seeded(0))
    assert penalty.item() == 0.0
    model, x, y = tiny()
    model = model.float()
    value = hessian_trace_penalty(nn.functional.cross_entropy(model(x.float()), y), model.parameters(), 4, seeded(1))
    assert value.dtype == torch.float32 and value.requires_grad


def test_argument_errors() -> None:
    model, x, y = tiny()
    loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(TypeError, match="scalar tensor"):
        hessian_trace_penalty(1.0, model.parameters())
    with pytest.raises(ValueError, match="scalar"):
        hessian_trace_penalty(model(x).sum(1), model.parameters())
    with pytest.raises(ValueError, match="no graph"):
        hessian_trace_penalty(loss.detach(), model.parameters())
    with pytest.raises(ValueError, match="NaN"):
        hessian_trace_penalty(loss * float("nan"), model.parameters())
    with pytest.raises(TypeError, match="iterable of tensors"):
        hessian_trace_penalty(loss, model[0].weight)
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        hessian_trace_penalty(loss, [])
    with pytest.raises(ValueError, match="num_samples"):
        hessian_trace_penalty(loss, model.parameters(), num_samples=0)
    with pytest.raises(TypeError, match="generator"):
        hessian_trace_penalty(loss, model.parameters(), generator=0)


def test_under_inference_mode_the_value_and_gradient_are_those_computed_outside_it() -> None:
    """A loss computed outside, the penalty inside ``torch.inference_mode()``: the same value, with its graph."""
    model, x, y = tiny()
    expected = hessian_trace_penalty(nn.functional.cross_entropy(model(x), y), model.parameters(), 3, seeded(2))
    loss = nn.functional.cross_entropy(model(x), y)
    before = snapshot(model)
    with torch.inference_mode():
        got = hessian_trace_penalty(loss, model.parameters(), 3, seeded(2))
    assert_unchanged(model, before)
    assert torch.equal(got, expected) and got.requires_grad and not got.is_inference()
    params = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, params),
                                                 torch.autograd.grad(expected, params)))
    with torch.inference_mode():
        inference_loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match=r"the loss has no graph: it was computed under torch\.inference_mode"):
        hessian_trace_penalty(inference_loss, model.parameters())


def test_a_loss_using_none_of_the_parameters_is_refused_and_partly_unused_ones_add_nothing() -> None:
    model, x, y = tiny()
    other, _, _ = tiny()  # the same weights in another model: the loss does not use them
    loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="the loss does not depend on any of params; pass the parameters it is"):
        hessian_trace_penalty(loss, other.parameters())
    spare = torch.ones(3, dtype=F64, requires_grad=True)  # unused beside used ones: zero curvature, no error
    value = hessian_trace_penalty(loss, [spare, *model.parameters()], num_samples=4, generator=seeded(0))
    size = sum(p.numel() for p in model.parameters())
    V = same_probes(3 + size, 4, seed=0)[3:]  # the probe rows of the used parameters
    H = curvature.reference.hessian_matrix(model, nn.CrossEntropyLoss(), (x, y))
    assert value.item() == pytest.approx(float(torch.einsum("pi,pq,qi->", V, H, V)) / 4, rel=1e-10)
