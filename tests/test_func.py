"""The functional core: hvp and ggn_vp for torch.func users, and the column engine."""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from helpers import rel_err
from torch.func import functional_call, vmap

import curvature


def quartic(x: torch.Tensor) -> torch.Tensor:
    return (x**4).sum() + x[0] * x[1]


def quartic_hessian(x: torch.Tensor) -> torch.Tensor:
    H = torch.diag(12 * x**2)
    H[0, 1] += 1
    H[1, 0] += 1
    return H


def test_hvp_matches_closed_form() -> None:
    x = torch.randn(5, dtype=torch.float64)
    v = torch.randn(5, dtype=torch.float64)
    (hv,) = curvature.hvp(quartic, (x,), (v,))
    assert rel_err(hv, quartic_hessian(x) @ v) <= 1e-14
    assert not hv.requires_grad


def test_hvp_composes_with_vmap() -> None:
    x = torch.randn(5, dtype=torch.float64)
    V = torch.randn(3, 5, dtype=torch.float64)
    HV = vmap(lambda v: curvature.hvp(quartic, (x,), (v,))[0])(V)
    assert rel_err(HV, V @ quartic_hessian(x)) <= 1e-14


def test_hvp_create_graph_is_differentiable() -> None:
    """d/dx (v^T H(x) v) = 24 x v^2 for the quartic; only create_graph=True gives it."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, dtype=torch.float64)
    (hv,) = curvature.hvp(quartic, (x,), (v,), create_graph=True)
    (g,) = torch.autograd.grad(hv @ v, x)
    assert rel_err(g, 24 * x.detach() * v**2) <= 1e-14


def _model_problem():
    case = make_case("layernorm_ce_mean")
    model, loss_fn, (x, y) = case["model"], case["loss_fn"], case["data"]
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    flat = torch.cat([t.reshape(-1) for t in tangent.values()])
    return case, model, loss_fn, x, y, params, tangent, flat


def test_hvp_on_model_params_matches_reference() -> None:
    case, model, loss_fn, x, y, params, tangent, flat = _model_problem()
    (hv,) = curvature.hvp(lambda p: loss_fn(functional_call(model, p, (x,)), y), (params,), (tangent,))
    ref = curvature.reference.hessian_matrix(model, loss_fn, case["data"]) @ flat
    assert rel_err(torch.cat([t.reshape(-1) for t in hv.values()]), ref) <= 1e-10


def test_ggn_vp_on_model_params_matches_reference() -> None:
    case, model, loss_fn, x, y, params, tangent, flat = _model_problem()
    (gv,) = curvature.ggn_vp(
        lambda p: functional_call(model, p, (x,)), lambda z: loss_fn(z, y), (params,), (tangent,)
    )
    ref = curvature.reference.ggn(model, loss_fn, case["data"]) @ flat
    assert rel_err(torch.cat([t.reshape(-1) for t in gv.values()]), ref) <= 1e-10


def test_ggn_vp_create_graph_is_differentiable() -> None:
    """For z = w * a and loss z^2: G = 2 a^2, so d/dw of v G v is 0 and d/da is 4 a v^2."""
    a = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.7], dtype=torch.float64)
    v = torch.tensor([2.0], dtype=torch.float64)
    (gv,) = curvature.ggn_vp(lambda w: w * a, lambda z: (z**2).sum(), (w,), (v,), create_graph=True)
    assert gv.item() == pytest.approx(2 * 1.5**2 * 2.0)
    (da,) = torch.autograd.grad(gv @ v, a)
    assert da.item() == pytest.approx(4 * 1.5 * 4.0)


def test_functional_refuses_non_tuple_primals() -> None:
    x = torch.randn(3)
    with pytest.raises(TypeError, match="tuples"):
        curvature.hvp(quartic, x, (x,))
    with pytest.raises(TypeError, match="tuples"):
        curvature.ggn_vp(lambda t: t, lambda z: z.sum(), [x], (x,))


def test_vectorize_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph vmap cannot batch still gives the right products, with a single warning (the warnings registry's)."""
    import warnings

    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::fake_op")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    case = make_case("mlp_tanh_ce_mean")
    H = curvature.HessianOperator(case["model"], case["loss_fn"], case["data"], vectorize=True)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:  # the default filters: shown once per place
        first = H @ V
        second = H @ V
    fallbacks = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallbacks) == 1 and fallbacks[0].category is RuntimeWarning
    assert "aten::fake_op" in str(fallbacks[0].message)
    with warnings.catch_warnings(record=True) as caught:  # a filter of the user's decides, not a flag of curvature's
        warnings.simplefilter("always")
        H @ V
        H @ V
    assert sum("falling back" in str(w.message) for w in caught) == 2
    ref = curvature.reference.hessian_matrix(case["model"], case["loss_fn"], case["data"]) @ V
    assert rel_err(first, ref) <= 1e-10 and torch.equal(first, second)
