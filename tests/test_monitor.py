"""SharpnessMonitor: agreement with fresh eigenvalues, the warm-start saving, nothing lost, history and plot."""

from __future__ import annotations

import copy
import json
import math
import warnings

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


# -- the top-k eigenspace: gradient and update overlaps, rotation, curvature along the gradient ----------------------
GEOMETRY = ("lambda_max", "gradient_overlap", "update_overlap", "rotation", "gradient_curvature")


def subspace_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 tanh MLP 5-6-4 (P = 64) with cross-entropy on 40 samples: small enough for the dense Hessian."""
    generator = seeded(7)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(40, 5, generator=seeded(8), dtype=torch.float64)
    return model, x, torch.randint(0, 4, (40,), generator=seeded(9))


def dense_truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The float64 Hessian, gradient, eigenvalues (descending) and eigenvectors (columns, in that order)."""
    H = curvature.reference.hessian_matrix(model, nn.CrossEntropyLoss(), (x, y))
    g = curvature.reference.gradient(model, nn.CrossEntropyLoss(), (x, y))
    values, vectors = torch.linalg.eigh(H)
    return H, g, values.flip(0), vectors.flip(1)


def fraction(v: torch.Tensor, Q: torch.Tensor) -> float:
    """‖Qᵀv‖² / ‖v‖² for orthonormal columns Q."""
    return float((Q.T @ v).pow(2).sum() / v.pow(2).sum())


def largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(curvature.linalg.subspace.principal_angles(a, b).max())


def in_exact_eigenspace(H: torch.Tensor, Q: torch.Tensor, theta: torch.Tensor, below: float) -> float:
    """The largest angle between span Q (Ritz pairs (θ, Q) of H) and the exact top-k eigenspace, checked against the
    Davis-Kahan sin θ bound ‖HQ − QΘ‖_F / (θ_k − λ_{k+1}); returns its sine."""
    k = Q.shape[1]
    U = torch.linalg.eigh(H).eigenvectors.flip(1)[:, :k]
    sine = math.sin(largest_angle(Q, U))
    assert sine <= float((H @ Q - Q * theta).norm()) / (float(theta[-1]) - below) + 1e-14
    return sine


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_overlap_and_curvature_against_the_dense_hessian(k: int) -> None:
    """The gradient's overlap with the top-k eigenspace (Gur-Ari et al. Eq. 2) and gᵀHg/‖g‖² against float64 dense
    linear algebra: exact for the monitor's own basis, within the basis's angle for the exact eigenspace."""
    model, x, y = subspace_problem()
    H, g, values, U = dense_truth(model, x, y)
    monitor = curvature.SharpnessMonitor(model, nn.CrossEntropyLoss(), (x, y), metrics=GEOMETRY, top_k=k, tol=1e-12,
                                         generator=seeded(0))
    entry = monitor.measure()
    Q = monitor.top_eigenvectors
    theta = torch.tensor(entry.top_eigenvalues if k > 1 else (entry.lambda_max,), dtype=torch.float64)
    assert Q.shape == (64, k) and (entry.top_eigenvalues is None) == (k == 1)
    assert theta.tolist() == pytest.approx(values[:k].tolist(), rel=1e-10)
    assert entry.gradient_norm == pytest.approx(float(g.norm()), rel=1e-10)
    assert entry.gradient_overlap == pytest.approx(fraction(g, Q), rel=1e-10)  # the monitor's gradient is g
    sine = in_exact_eigenspace(H, Q, theta, float(values[k]))
    # |ĝᵀ(P_Q − P_U)ĝ| ≤ ‖P_Q − P_U‖₂ = sin θ_max
    assert abs(entry.gradient_overlap - fraction(g, U[:, :k])) <= sine + 1e-12
    assert entry.gradient_curvature == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-10)
    assert float(values[-1]) <= entry.gradient_curvature <= entry.lambda_max
    assert entry.rotation is entry.update_overlap is entry.update_norm is entry.principal_angles is None


def test_rotation_and_update_overlap_between_measurements_against_the_dense_hessian() -> None:
    """A gradient step between two measurements: the update is that step, the rotation the principal angles between
    the two bases (exactly), and within the bases' own angles those between the exact eigenspaces."""
    model, x, y = subspace_problem()
    H1, g, values1, U1 = dense_truth(model, x, y)
    monitor = curvature.SharpnessMonitor(model, nn.CrossEntropyLoss(), (x, y), metrics=GEOMETRY, top_k=3, tol=1e-12,
                                         generator=seeded(0))
    first = monitor.measure()
    Q1 = monitor.top_eigenvectors
    update = -0.5 * g
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(model.parameters()) + update,
                                            model.parameters())
    H2, _, values2, U2 = dense_truth(model, x, y)
    second = monitor.measure()
    Q2 = monitor.top_eigenvectors
    angles = curvature.linalg.subspace.principal_angles(Q1, Q2)
    assert second.principal_angles == pytest.approx(angles.tolist(), abs=1e-12)
    assert second.rotation == max(second.principal_angles) > 0.05  # the step turned the eigenspace
    assert second.eigenspace_overlap == pytest.approx(
        float(curvature.linalg.subspace.subspace_overlap(Q2, Q1, reduce="subspace")), rel=1e-10)
    assert second.update_norm == pytest.approx(float(update.norm()), rel=1e-10)
    assert second.update_overlap == pytest.approx(fraction(update, Q2), rel=1e-10)
    sine1 = in_exact_eigenspace(H1, Q1, torch.tensor(first.top_eigenvalues), float(values1[3]))
    sine2 = in_exact_eigenspace(H2, Q2, torch.tensor(second.top_eigenvalues), float(values2[3]))
    assert abs(second.update_overlap - fraction(update, U2[:, :3])) <= sine2 + 1e-12
    # the largest principal angle is a metric on subspaces of one dimension: two triangle inequalities
    assert abs(second.rotation - largest_angle(U1[:, :3], U2[:, :3])) <= math.asin(sine1) + math.asin(sine2) + 1e-12


@pytest.mark.parametrize("batches", [1, 4])
def test_geometry_spends_no_product_but_gradient_curvature_one(batches: int) -> None:
    """Side by side on one training run, identical Lanczos runs: the overlaps and the rotation add no product (the
    gradient is read from the kept graph, or computed by a pass over a loader), the curvature along g exactly one."""
    model, x, y = subspace_problem()
    data = (x, y) if batches == 1 else list(zip(x.chunk(batches), y.chunk(batches)))
    kinds = {"plain": ("lambda_max",), "geometry": GEOMETRY[:4], "all": GEOMETRY}
    monitors = {name: curvature.SharpnessMonitor(model, nn.CrossEntropyLoss(), data, metrics=metrics, top_k=3,
                                                 generator=seeded(0)) for name, metrics in kinds.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(4):
        entries = {name: monitor.measure() for name, monitor in monitors.items()}
        assert entries["geometry"].num_matvecs == entries["plain"].num_matvecs
        assert entries["all"].num_matvecs == entries["plain"].num_matvecs + 1
        assert entries["geometry"].lambda_max == entries["all"].lambda_max == entries["plain"].lambda_max
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert monitors["all"].total_matvecs == monitors["plain"].total_matvecs + 4


def test_gradient_from_grad_reads_the_parameters_grad_and_leaves_it() -> None:
    model, x, y = subspace_problem()
    model[0].weight.grad = torch.randn(6, 5, generator=seeded(1), dtype=torch.float64)
    model[2].weight.grad = torch.randn(4, 6, generator=seeded(2), dtype=torch.float64)  # the biases have none
    before = snapshot(model)
    monitor = curvature.SharpnessMonitor(model, nn.CrossEntropyLoss(), (x, y), metrics=GEOMETRY, top_k=2,
                                         gradient="grad", generator=seeded(0))
    entry = monitor.measure()
    assert_unchanged(model, before)
    g = torch.cat([model[0].weight.grad.reshape(-1), torch.zeros(6), model[2].weight.grad.reshape(-1), torch.zeros(4)])
    H = curvature.reference.hessian_matrix(model, nn.CrossEntropyLoss(), (x, y))
    assert entry.gradient_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert entry.gradient_overlap == pytest.approx(fraction(g, monitor.top_eigenvectors), rel=1e-10)
    assert entry.gradient_curvature == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-10)
    for p in model.parameters():
        p.grad = None
    with pytest.raises(ValueError, match=r"gradient='grad' reads the parameters' \.grad, but none"):
        monitor.measure()


def test_top_k_warm_start_from_the_sum_of_the_previous_eigenvectors_saves_products() -> None:
    """eigenvalues takes one start vector: the monitor starts from the sum of the previous k eigenvectors. On the
    edge-of-stability run, k = 5 (calibrated: 647 products warm, 864 cold over 20 measurements at tol 1e-4)."""
    model, x, y = training_problem()
    monitors = {warm: curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), every=20, top_k=5, warm_start=warm,
                                                 generator=seeded(0)) for warm in (True, False)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvature.PrecisionWarning)  # float32 certifies about 1e-4 here
        for _ in range(400):
            for monitor in monitors.values():
                monitor.step()
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for warm, cold in zip(monitors[True].history, monitors[False].history):
        assert warm.top_eigenvalues == pytest.approx(cold.top_eigenvalues, rel=1e-3)
    assert monitors[True].total_matvecs < 0.85 * monitors[False].total_matvecs


def test_geometry_changes_nothing_keeps_old_keys_and_serializes(tmp_path) -> None:
    model, x, y = training_problem()
    model.append(nn.Dropout(0.5))  # measured in eval mode, then restored
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    plain = curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), metrics=("lambda_max", "trace"), num_matvecs=4,
                                       eval_mode=True, generator=seeded(0))
    monitor = curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), metrics=GEOMETRY + ("lambda_min",), top_k=3,
                                         tol=1e-3, eval_mode=True, generator=seeded(0))
    for source in ("loss", "grad"):
        monitor.gradient = source
        monitor.measure()
        plain.measure()
        assert_unchanged(model, before)
    assert list(plain.history[0]) == ["step", "residuals", "lambda_max", "converged", "trace", "trace_std_error",
                                      "num_matvecs", "seconds"]  # the keys a monitor always wrote
    assert list(monitor.history[-1]) == [
        "step", "residuals", "lambda_max", "top_eigenvalues", "converged", "gradient_overlap", "gradient_norm",
        "update_overlap", "update_norm", "rotation", "principal_angles", "eigenspace_overlap", "gradient_curvature",
        "lambda_min", "num_matvecs", "seconds"]
    record = json.loads(json.dumps(monitor.to_dict()))
    assert record["top_k"] == 3 and record["history"][0]["rotation"] is None
    assert record["history"][1]["top_eigenvalues"] == list(monitor.history[1].top_eigenvalues)
    assert monitor.plot(tmp_path / "geometry.png").read_bytes()[:4] == b"\x89PNG"


GEOMETRY_ERRORS = {  # name: (keyword arguments, error, message)
    "overlap without lambda_max": (dict(metrics=("trace", "gradient_overlap")), ValueError,
                                   r"gradient_overlap use the top-k eigenvectors of the 'lambda_max' run: add"),
    "top_k without lambda_max": (dict(metrics=("lambda_min",), top_k=3), ValueError, r"top_k > 1 use the top-k"),
    "top_k zero": (dict(top_k=0), ValueError, "top_k must be at least 1"),
    "top_k float": (dict(top_k=2.0), TypeError, "top_k must be an int"),
    "top_k above P": (dict(top_k=100000), ValueError, "top_k=100000 exceeds the number of parameters measured, 12500"),
    "gradient source": (dict(gradient="batch"), ValueError, "gradient must be 'loss'"),
}


@pytest.mark.parametrize("name", sorted(GEOMETRY_ERRORS))
def test_geometry_argument_errors_leave_the_model_unchanged(name: str) -> None:
    model, x, y = training_problem()
    before = snapshot(model)
    arguments, error, message = GEOMETRY_ERRORS[name]
    with pytest.raises(error, match=message):
        curvature.SharpnessMonitor(model, nn.MSELoss(), (x, y), **arguments)
    assert_unchanged(model, before)
