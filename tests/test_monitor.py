"""SharpnessMonitor: agreement with fresh eigenvalues, the warm-start saving, nothing lost, history and plot."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_unchanged, seeded, snapshot
from torch import nn

import curvature


def training_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The edge-of-stability setting: a bias-free tanh MLP 20-100-100-5 (weights N(0, 1/fan_in)), 256 samples."""
    generator = seeded(1)
    model = nn.Sequential(nn.Linear(20, 100, bias=False), nn.Tanh(), nn.Linear(100, 100, bias=False), nn.Tanh(),
                          nn.Linear(100, 5, bias=False))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features), generator=generator)
    x = torch.randn(256, 20, generator=seeded(2))
    y = nn.functional.one_hot(torch.randint(0, 5, (256,), generator=seeded(3)), 5).float()
    return model, x, y


def train(monitor: curvature.SharpnessMonitor, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
          steps: int, check: bool = False) -> None:
    """Full-batch gradient descent at step size 0.2 (the edge of stability is λ_max = 10)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(steps):
        entry = monitor.step()
        if entry is not None and check:  # the monitor's value against a fresh, tightly converged computation
            # the truth in float64: float32 products certify about 1e-5 relative error only
            H = curvature.HessianOperator(copy.deepcopy(model).double(), nn.MSELoss(), (x.double(), y.double()))
            fresh = float(curvature.eigenvalues(H, tol=1e-10, generator=seeded(5)).values[0])
            # the residual bound: some eigenvalue lies within ‖r‖ ≤ tol |θ| of the monitor's Ritz value θ
            assert abs(entry["lambda_max"] - fresh) <= monitor.tol * abs(entry["lambda_max"]) + 1e-8 * fresh
            assert entry["converged"]["lambda_max"]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_monitor_agrees_with_fresh_eigenvalues_and_warm_start_halves_the_products() -> None:
    """Over 1000 steps of full-batch gradient descent, λ_max every 20 steps (50 measurements)."""
    model, x, y = training_problem()
    warm = curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), every=20, generator=seeded(0))  # tol 1e-4
    train(warm, model, x, y, steps=1000, check=True)
    model, x, y = training_problem()
    cold = curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), every=20, warm_start=False, generator=seeded(0))
    train(cold, model, x, y, steps=1000)
    assert len(warm.history) == len(cold.history) == 50
    for a, b in zip(warm.history, cold.history):
        assert a["lambda_max"] == pytest.approx(b["lambda_max"], rel=2e-4)
    assert 2 * warm.total_matvecs <= cold.total_matvecs, (warm.total_matvecs, cold.total_matvecs)


def test_monitor_changes_nothing_and_keeps_a_history(tmp_path) -> None:
    model, x, y = training_problem()
    model.append(nn.Dropout(0.5))  # stochastic in train mode: measured in eval mode, then restored
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    monitor = curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), every=2, metrics=("lambda_max", "lambda_min",
                                         "trace"), num_matvecs=20, eval_mode=True)
    before = snapshot(model)
    assert monitor.step() is not None and monitor.step() is None and monitor.step() is not None
    assert_unchanged(model, before)
    entry = monitor.history[-1]
    assert entry["step"] == 3 and entry["lambda_min"] <= entry["lambda_max"] and math.isfinite(entry["trace"])
    record = monitor.to_dict()
    assert record["total_matvecs"] == sum(e["num_matvecs"] for e in monitor.history) > 0
    assert monitor.plot(tmp_path / "history.png", lines={"2/eta": 1.0}).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="drops units at random"):  # refused when built, not at the first step
        curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y))


def test_monitor_argument_errors() -> None:
    model, x, y = training_problem()
    with pytest.raises(ValueError, match="metrics must be"):
        curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), metrics=("top_k",))
    with pytest.raises(ValueError, match="every"):
        curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), every=0)
    with pytest.raises(ValueError, match="tol must be positive"):
        curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), tol=0.0)
    with pytest.raises(ValueError, match="operator must be"):
        curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), operator="kfac2")
    with pytest.raises(TypeError, match="warm_start must be a bool"):
        curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), warm_start=1)


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[3, 2] = float("nan")
    return x


BAD_INPUTS = {  # name: (keyword arguments from (x, y), error, message)
    "generator": (lambda x, y: dict(data=((x, y) for _ in range(2))), TypeError, "one-shot iterator"),
    "nan": (lambda x, y: dict(data=(with_nan(x), y)), ValueError, "the loss on the first batch contains NaN or Inf"),
    "misspelt params": (lambda x, y: dict(data=(x, y), params=["0.wieght"]), ValueError, "params names '0.wieght'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_monitor_refuses_bad_inputs_when_built_and_leaves_the_model_unchanged(name: str) -> None:
    model, x, y = training_problem()
    model.append(nn.Dropout(0.5))  # in train mode: the checks run in eval mode, and the flags come back
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    arguments, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=message):
        curvature.SharpnessMonitor(model, nn.MSELoss(), every=5, eval_mode=True, **arguments(x, y))
    assert_unchanged(model, before)


def test_monitor_checks_valid_inputs_when_built_and_leaves_the_model_unchanged() -> None:
    model, x, y = training_problem()
    model.append(nn.Dropout(0.5))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, inputs: forwards.append(module.training))
    before = snapshot(model)
    monitor = curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), params=["2.weight"], eval_mode=True,
                                         generator=seeded(0))
    assert_unchanged(model, before)
    assert forwards and not any(forwards)  # the operator's checks ran at construction, in eval mode
    hook.remove()
    entry = monitor.step()
    assert_unchanged(model, before)
    assert entry is not None and entry["lambda_max"] > 0 and entry["num_matvecs"] == monitor.total_matvecs > 0
    with torch.no_grad():  # a training step moves the weights: the next measurement follows them
        model[2].weight.mul_(2.0)
    second = monitor.measure()
    H = curvature.HessianOperator(copy.deepcopy(model).eval().double(), nn.MSELoss(), (x.double(), y.double()),
                                  params=["2.weight"])
    fresh = float(curvature.eigenvalues(H, tol=1e-10, generator=seeded(5)).values[0])
    assert abs(second["lambda_max"] - fresh) <= monitor.tol * fresh
    assert monitor.total_matvecs == entry["num_matvecs"] + second["num_matvecs"]


@pytest.mark.parametrize("operator", ["kfac", "ekfac"])
def test_monitor_with_kronecker_factors_follows_the_training(operator: str) -> None:
    """Every entry's λ_max is the largest block eigenvalue of K-FAC (EK-FAC) recomputed at that step's parameters:
    the factors follow the training, and the trace is the blocks' within its error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    monitor = curvature.SharpnessMonitor(model, nn.CrossEntropyLoss(), (x, y), metrics=("lambda_max", "trace"),
                                         operator=operator, every=2, tol=1e-9, generator=seeded(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []
    for _ in range(6):
        entry = monitor.step()
        if entry is not None:
            op = curvature.operators.operator_class(operator)(copy.deepcopy(model), nn.CrossEntropyLoss(), (x, y))
            largest = max(float(block.eigenvalues.max()) for block in op.eigh())
            assert entry["lambda_max"] == pytest.approx(largest, rel=1e-8)
            assert abs(entry["trace"] - float(op.trace())) < 5 * entry["trace_std_error"]
            seen.append(entry["lambda_max"])
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert len(seen) == 3 and len(set(seen)) == 3  # the parameters moved, and the factors with them
