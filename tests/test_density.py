"""Stochastic Lanczos quadrature against dense float64 spectra over the case registry."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_unchanged, build, operator_cases, reference, seeded, watched

from curvature import sampling, spectral_density

PAIRS = pytest.mark.parametrize("kind, case_name", operator_cases())
NUM_PROBES, NUM_STEPS = 30, 15  # 30 probes: a standard error from fewer skewed vᵀAv runs low




@PAIRS
def test_quadrature_against_dense(kind: str, case_name: str) -> None:
    dense = reference(kind, case_name)
    size = dense.shape[0]
    density = spectral_density(build(kind, case_name), NUM_PROBES, NUM_STEPS, seeded(0))
    assert abs(float(density.weights.sum()) - 1) <= 1e-12
    for _, weights in density.per_probe():
        assert abs(float(weights.sum()) - 1) <= 1e-12
    assert bool((density.weights >= 0).all())
    # The same probes, drawn again from the same seed: the first moment is their Hutchinson estimate.
    V = sampling.probes("rademacher", (size, NUM_PROBES), seeded(0), torch.float64)
    quotients = (V * (dense @ V)).sum(0) / (V * V).sum(0)
    scale = float(dense.norm(2))
    assert abs(density.moment(1) - float(quotients.mean())) <= 1e-10 * scale
    # Gauss quadrature with m >= 2 nodes is exact for degree 2: the second moment too.
    second = ((dense @ V) ** 2).sum(0) / (V * V).sum(0)
    assert abs(density.moment(2) - float(second.mean())) <= 1e-10 * scale**2
    # tr(A)/P within 3 standard errors of that estimate (probes and seeds fixed; pooled over the
    # registry the z-scores of the trace estimators are checked for calibration in test_trace.py).
    estimate = density.trace_estimate()
    exact = float(torch.trace(dense))
    assert abs(estimate.value - exact) <= 3 * estimate.std_error + 1e-10 * abs(exact)
    assert abs(estimate.value / size - float(quotients.mean())) <= 1e-10 * scale
    # Ritz values lie inside the spectrum.
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert float(density.nodes.min()) >= float(eigenvalues[0]) - 1e-10 * scale
    assert float(density.nodes.max()) <= float(eigenvalues[-1]) + 1e-10 * scale
    assert density.num_matvecs <= NUM_PROBES * NUM_STEPS


@pytest.mark.parametrize("case_name", ["mlp_tanh_ce_mean", "cnn_ce_mean"])
def test_full_length_lanczos_recovers_the_spectrum(case_name: str) -> None:
    """With m = P steps each probe's quadrature is the whole spectral measure: nodes are eigenvalues."""
    dense = reference("hessian", case_name)
    size = dense.shape[0]
    density = spectral_density(build("hessian", case_name), 1, size, seeded(1))
    eigenvalues, vectors = torch.linalg.eigh(dense)
    V = sampling.probes("rademacher", (size, 1), seeded(1), torch.float64)[:, 0]
    weights = (vectors.T @ V) ** 2 / size  # the spectral measure seen from the probe
    assert abs(density.moment(1) - float(weights @ eigenvalues)) <= 1e-10 * float(dense.norm(2))
    heavy = density.weights > 1e-6
    distance = (density.nodes[heavy, None] - eigenvalues[None, :]).abs().min(1).values
    assert float(distance.max()) <= 1e-8 * float(dense.norm(2))


def test_evaluate_integrates_to_one_and_plot(tmp_path) -> None:
    A = torch.diag(torch.cat([torch.linspace(0, 1, 90), torch.tensor([5.0, 8.0])]).double())
    density = spectral_density(A, 4, 30, seeded(0))
    grid = torch.linspace(-2, 10, 4001, dtype=torch.float64)
    values = density.evaluate(grid, sigma=0.05)
    assert abs(float(torch.trapezoid(values, grid)) - 1) <= 1e-6
    path = density.plot(tmp_path / "density.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="sigma must be positive"):
        density.evaluate(grid, sigma=0.0)


def test_invariant_subspace_stops_early() -> None:
    """A probe in a 3-dimensional invariant subspace: 3 products, exact nodes, no spurious ones."""
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 7.0, 7.0], dtype=torch.float64))
    density = spectral_density(A, 2, 6, seeded(0))
    assert density.num_matvecs == 6
    assert torch.allclose(density.nodes, torch.tensor([1.0, 2, 7, 1, 2, 7], dtype=torch.float64), atol=1e-12)
    assert abs(density.moment(1) - 10 / 3) <= 1e-12


def test_same_seed_same_bits_and_nothing_changed() -> None:
    model, op, before = watched("ggn")
    first, second = spectral_density(op, 3, 10, seeded(4)), spectral_density(op, 3, 10, seeded(4))
    assert torch.equal(first.nodes, second.nodes) and torch.equal(first.weights, second.weights)
    spectral_density(op, 2, 5)  # generator=None: the global stream stays untouched
    assert_unchanged(model, before)


def test_float32() -> None:
    density = spectral_density(build("ggn", "cnn_ce_mean", torch.float32), 4, 20, seeded(0))
    dense = reference("ggn", "cnn_ce_mean")
    V = sampling.probes("rademacher", (dense.shape[0], 4), seeded(0), torch.float64)
    expected = float(((V * (dense @ V)).sum(0) / (V * V).sum(0)).mean())
    assert abs(density.moment(1) - expected) <= 1e-5 * float(dense.norm(2))
    assert abs(float(density.weights.sum()) - 1) <= 1e-12


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_probes=0), ValueError, "num_probes must be at least 1"),
        (dict(num_steps=0), ValueError, "num_steps must be at least 1"),
        (dict(distribution="uniform"), ValueError, "distribution must be one of"),
        (dict(generator="seed"), TypeError, "torch.Generator"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        spectral_density(torch.eye(4, dtype=torch.float64), **kwargs)


def test_one_probe_has_no_standard_error() -> None:
    density = spectral_density(torch.eye(4, dtype=torch.float64), 1, 2, seeded(0))
    assert density.trace_estimate().value == pytest.approx(4.0, rel=1e-12)
    assert math.isinf(density.trace_estimate().std_error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_invariant_test_scales_with_the_products(dtype: torch.dtype) -> None:
    """In half precision every probe runs its steps (before, 100 ε of the dtype, 0.8 ‖T‖ in bfloat16 and 0.1 ‖T‖
    in float16, made the first β look like an invariant subspace: one node per probe), and the nodes reach the
    extreme eigenvalues."""
    values = torch.linspace(0.5 if dtype == torch.bfloat16 else 1.8, 2.0, 80, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64, generator=seeded(2))).Q
    A = ((Q * values) @ Q.T).to(dtype)
    A = ((A.double() + A.double().T) / 2).to(dtype)
    density = spectral_density(A, 3, 25, seeded(0))
    assert density.num_matvecs == 3 * 25
    exact = torch.linalg.eigvalsh(A.double())
    unit = torch.finfo(dtype).eps / 2
    assert abs(float(density.nodes.max() - exact[-1])) <= 4 * unit * 2.0
    assert abs(density.moment(1) - float(exact.mean())) <= 0.1 * float(exact.max() - exact.min())  # 3 probes


def test_non_symmetric_input_is_refused() -> None:
    M = torch.triu(torch.ones(6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"op is not symmetric.*\(op \+ op.T\) / 2"):
        spectral_density(M, 2, 3, seeded(0))
