"""The one-call sharpness report against dense float64 references."""

from __future__ import annotations

import json

import pytest
import torch
from cases import FACTORIES, make_case
from helpers import assert_unchanged, reference, seeded, snapshot

import curvature
from curvature import METRICS, sharpness


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
@pytest.mark.parametrize("case_name", sorted(FACTORIES))
def test_report_matches_dense(case_name: str, operator: str) -> None:
    case = make_case(case_name, torch.float64)
    model = case["model"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = snapshot(model)
    # λ_min of a GGN is its null space (0) next to a cluster of tiny eigenvalues: a slow, uninteresting target
    metrics = METRICS if operator == "hessian" else tuple(m for m in METRICS if m != "lambda_min")
    report = sharpness(
        model, case["loss_fn"], case["data"], metrics=metrics, operator=operator, k=3, tol=1e-8,
        trace_method="exact", num_matvecs=30, density_probes=2, density_steps=10, generator=seeded(0), quiet=True,
    )
    assert_unchanged(model, before)
    dense = reference(operator, case_name)
    eigenvalues = torch.linalg.eigvalsh(dense)
    scale = float(eigenvalues.abs().max())
    assert report.num_params == dense.shape[0]
    assert abs(report.lambda_max - float(eigenvalues[-1])) <= 1e-8 * scale
    assert torch.allclose(report.top_k, eigenvalues.flip(0)[:3], rtol=0, atol=1e-8 * scale)
    if operator == "hessian":
        assert abs(report.lambda_min - float(eigenvalues[0])) <= 1e-8 * scale
    assert abs(report.trace.value - float(eigenvalues.sum())) <= 1e-10 * float(eigenvalues.abs().sum())
    frobenius = float(dense.norm())
    assert abs(report.frobenius_norm.value - frobenius) <= 4 * report.frobenius_norm.std_error + 1e-10 * frobenius
    assert abs(float(report.density.weights.sum()) - 1) <= 1e-12
    assert report.num_matvecs["total"] == sum(v for k, v in report.num_matvecs.items() if k != "total")
    assert report.num_matvecs["trace"] == dense.shape[0]


def test_print_dict_json(tmp_path) -> None:
    case = make_case("cnn_ce_mean", torch.float64)
    report = sharpness(case["model"], case["loss_fn"], case["data"], metrics=METRICS, generator=seeded(0), quiet=True,
                       density_steps=20)
    text = str(report)
    for name in ("lambda_max", "top_5", "lambda_min", "trace", "frobenius_norm", "density", "total", "products"):
        assert name in text
    data = report.to_dict()
    assert data["lambda_max"] == report.lambda_max and len(data["top_k"]) == 5
    assert data["converged"] == {"top_k": True, "lambda_min": True}
    assert json.loads(report.to_json(tmp_path / "report.json")) == json.loads(json.dumps(data))
    assert json.loads((tmp_path / "report.json").read_text())["trace"]["value"] == report.trace.value


def test_default_metrics_reproducible_and_quiet(capsys: pytest.CaptureFixture) -> None:
    case = make_case("mlp_tanh_ce_mean", torch.float64)
    first = sharpness(case["model"], case["loss_fn"], case["data"], generator=seeded(3), quiet=True)
    second = sharpness(case["model"], case["loss_fn"], case["data"], generator=seeded(3), quiet=True)
    assert first.lambda_max == second.lambda_max and first.trace == second.trace
    assert first.top_k is None and first.density is None
    assert capsys.readouterr().err == ""
    state = torch.get_rng_state()
    sharpness(case["model"], case["loss_fn"], case["data"], quiet=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_fisher_options_reach_the_operator() -> None:
    case = make_case("mlp_tanh_ce_mean", torch.float64)
    report = sharpness(case["model"], case["loss_fn"], case["data"], metrics=("lambda_max",), operator="fisher",
                       mc_samples=2, generator=seeded(0), quiet=True)
    assert report.operator == "fisher" and report.lambda_max > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metrics=("sharpness",)), "metrics must be"),
        (dict(metrics=()), "metrics must be"),
        (dict(operator="kfac2"), "operator must be one of .*'kfac', 'ekfac'"),
        (dict(trace_method="hutch+"), "trace_method must be one of"),
        (dict(num_matvecs=1), "num_matvecs must be at least 2"),
        (dict(tol=0.0), "tol must be positive"),
        (dict(metrics=("density",), density_steps=0), "density_steps must be at least 1"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    case = make_case("mlp_tanh_ce_mean", torch.float64)
    with pytest.raises(ValueError, match=match):
        sharpness(case["model"], case["loss_fn"], case["data"], quiet=True, **kwargs)


# -- the Kronecker-factored approximations: their eigenvalues are the blocks' ------------------------------------


@pytest.mark.parametrize("operator", ["kfac", "ekfac"])
@pytest.mark.parametrize("case_name", ["mlp_tanh_ce_mean", "cnn_ce_mean", "loader_uneven_mse_mean"])
def test_kronecker_factored_report_matches_the_blocks_eigendecomposition(case_name: str, operator: str) -> None:
    """λ_max and the top 3 are the largest eigenvalues of all the blocks (``.eigh()``), the trace is the blocks'."""
    case = make_case(case_name, torch.float64)
    model = case["model"]
    before = snapshot(model)
    report = sharpness(model, case["loss_fn"], case["data"], metrics=("lambda_max", "top_k", "trace"),
                       operator=operator, k=3, tol=1e-10, trace_method="exact", generator=seeded(0), quiet=True)
    assert_unchanged(model, before)
    op = curvature.operators.operator_class(operator)(model, case["loss_fn"], case["data"])
    blocks = torch.cat([block.eigenvalues.reshape(-1) for block in op.eigh()]).sort(descending=True).values
    assert report.operator == operator and report.num_params == op.shape[0] == blocks.numel()
    assert report.lambda_max == pytest.approx(float(blocks[0]), rel=1e-10)
    assert torch.allclose(report.top_k, blocks[:3], rtol=1e-8, atol=0)
    assert report.trace.value == pytest.approx(float(op.trace()), rel=1e-10)
    assert report.converged["top_k"]


def test_kronecker_factored_options_reach_the_operator_and_the_mc_draws_follow_the_generator() -> None:
    case = make_case("mlp_tanh_ce_mean", torch.float64)

    def measure(**kwargs: object) -> float:
        return sharpness(case["model"], case["loss_fn"], case["data"], metrics=("lambda_max",), operator="kfac",
                         tol=1e-10, quiet=True, **kwargs).lambda_max

    mc = [measure(fisher_type="mc", generator=seeded(seed)) for seed in (0, 0, 1)]
    assert mc[0] == mc[1] != mc[2]
    empirical = measure(fisher_type="empirical", generator=seeded(0))
    K = curvature.KFACOperator(case["model"], case["loss_fn"], case["data"], fisher_type="empirical")
    assert empirical == pytest.approx(max(float(b.eigenvalues.max()) for b in K.eigh()), rel=1e-10)
    assert empirical != pytest.approx(measure(generator=seeded(0)), rel=1e-3)
