"""Newton-CG preconditioned by the damped K-FAC inverse: the same steps, the same descent.

Whether it saves iterations depends on how much of the curvature the block diagonal holds (on a small digits MLP
the exact block-diagonal inverse saves a fifth, K-FAC's costs more: docs/optimizers.md); where K-FAC is the block
diagonal and the blocks are all there is (a single layer), it is the exact inverse and CG takes one step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature
from curvature.cli.digits import load_split
from curvature.optim.functional import hessian_free_step


def _problem() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    x, _, y, _ = load_split(torch.float64)
    model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).double()
    return model, nn.CrossEntropyLoss(), (x[:400], y[:400])


def test_kfac_preconditioned_cg_solves_the_same_system() -> None:
    """One damped GGN solve of the digits MLP: the same step to 1e-8 with and without the K-FAC preconditioner."""
    model, loss_fn, batch = _problem()
    G = curvature.GGNOperator(model, loss_fn, batch)
    K = curvature.KFACOperator(model, loss_fn, batch)
    params = [p for p in model.parameters()]
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)])
    damping = 1e-3
    plain = hessian_free_step(G, grad, damping, tol=1e-10, max_iter=2000)
    preconditioned = hessian_free_step(G, grad, damping, tol=1e-10, max_iter=2000, preconditioner=K.inverse(damping))
    assert plain.converged and preconditioned.converged
    assert float((plain.direction - preconditioned.direction).norm() / plain.direction.norm()) < 1e-8
    assert preconditioned.iterations != plain.iterations  # it was applied


def test_exact_kfac_makes_cg_take_one_step() -> None:
    """A linear model with MSE and one data point: K-FAC is the GGN, its damped inverse solves in one iteration."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    batch = (torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64))
    G = curvature.GGNOperator(model, nn.MSELoss(), batch)
    K = curvature.KFACOperator(model, nn.MSELoss(), batch)
    grad = torch.randn(G.shape[0], dtype=torch.float64)
    step = hessian_free_step(G, grad, 1e-2, tol=1e-10, preconditioner=K.inverse(1e-2))
    assert step.iterations == 1 and step.converged
    assert hessian_free_step(G, grad, 1e-2, tol=1e-10).iterations > 1


@pytest.mark.parametrize("optimizer", ["HessianFree", "RegularizedNewton"])
def test_optimizers_take_a_kfac_preconditioner(optimizer: str) -> None:
    """Both optimizers accept ``preconditioner=(params, shift) -> operator`` and call it with the step's shift."""
    results, shifts = {}, []
    for preconditioned in (False, True):
        model, loss_fn, batch = _problem()
        K = curvature.KFACOperator(model, loss_fn, batch)

        def ggn(params: list, model: nn.Module = model, loss_fn: nn.Module = loss_fn,
                batch: tuple = batch) -> curvature.GGNOperator:
            return curvature.GGNOperator(model, loss_fn, batch, params=params)

        def preconditioner(params: list, shift: float, K: curvature.KFACOperator = K) -> curvature.LinearOperator:
            assert len(params) == 4
            shifts.append(shift)
            return K.inverse(shift)

        extra = {"preconditioner": preconditioner} if preconditioned else {}
        if optimizer == "HessianFree":
            opt = curvature.optim.HessianFree(model.parameters(), damping=1e-2, curvature=ggn, cg_tol=1e-6,
                                              **extra)
        else:
            opt = curvature.optim.RegularizedNewton(model.parameters(), gamma=10.0, curvature=ggn, cg_tol=1e-6,
                                                    **extra)
        closure = lambda model=model, loss_fn=loss_fn, batch=batch: loss_fn(model(batch[0]), batch[1])  # noqa: E731
        first = float(closure())
        for _ in range(4):
            opt.step(closure)
        state = opt.state[next(iter(model.parameters()))]
        results[preconditioned] = (float(closure()) / first, state["num_matvecs"])
    (plain_ratio, plain_products), (ratio, products) = results[False], results[True]
    assert ratio < 0.5 and plain_ratio < 0.5
    assert len(shifts) >= 4 and all(s > 0 for s in shifts) and products != plain_products


def test_bad_preconditioner_is_refused() -> None:
    model, loss_fn, batch = _problem()
    with pytest.raises(TypeError, match="preconditioner must be None or a callable"):
        curvature.optim.HessianFree(model.parameters(), preconditioner=torch.eye(3))
