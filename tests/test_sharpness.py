"""The one-call sharpness report against dense float64 references."""

from __future__ import annotations

import json

import pytest
import torch
from cases import FACTORIES, make_case
from helpers import assert_unchanged, reference, seeded, snapshot

import curvature
from curvature import METRICS, sharpness
from curvature.sharpness import parameter_blocks


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


# -- the per-block table: λ_max and trace of each diagonal block H_bb -------------------------------------------

BLOCK_CASES = ["mlp_tanh_ce_mean", "cnn_ce_mean", "layernorm_ce_mean", "embedding_ce_mean", "frozen_ce_sum",
               "tied_dict_inputs_ce_sum", "loader_uneven_mse_mean", "lm_shifted_tokens_mean"]


def block_index(model: torch.nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """The positions of the parameters ``names`` in the flat vector of every trainable parameter (the references')."""
    offsets, start = {}, 0
    for name, p in curvature.operators.curvature.select_parameters(model, None):
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    return torch.cat([offsets[name] for name in names])


def check_blocks_against(report: curvature.SharpnessReport, dense: torch.Tensor, model: torch.nn.Module) -> None:
    """Each row's λ_max and trace are those of the dense matrix restricted to the row's parameters."""
    for block in report.blocks:
        index = block_index(model, block.params)
        restricted = dense[index][:, index]
        eigenvalues = torch.linalg.eigvalsh(restricted)
        scale = float(eigenvalues.abs().max())
        assert block.num_params == index.numel()
        assert abs(block.lambda_max - float(eigenvalues[-1])) <= 1e-8 * scale, block.name
        assert block.converged and block.residual is not None
        if block.trace.std_error == 0:
            assert abs(block.trace.value - float(restricted.trace())) <= 1e-10 * float(eigenvalues.abs().sum())
        else:
            assert abs(block.trace.value - float(restricted.trace())) <= 4 * block.trace.std_error


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
@pytest.mark.parametrize("case_name", BLOCK_CASES)
def test_block_table_matches_the_dense_blocks(case_name: str, operator: str) -> None:
    """``blocks=True``: one row per module with parameters of its own, each the dense reference's diagonal block."""
    case = make_case(case_name, torch.float64)
    model = case["model"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = snapshot(model)
    report = sharpness(model, case["loss_fn"], case["data"], metrics=("lambda_max", "trace"), operator=operator,
                       tol=1e-10, trace_method="exact", blocks=True, generator=seeded(0), quiet=True)
    assert_unchanged(model, before)
    owners = [path for path, module in model.named_modules()
              if any(p.requires_grad for p in module.parameters(recurse=False))]
    if case_name == "tied_dict_inputs_ce_sum":
        assert report.blocks[1].params == ("second.bias",)  # the shared weight is first's
    assert [block.name for block in report.blocks] == owners
    names = [name for block in report.blocks for name in block.params]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # a partition
    check_blocks_against(report, reference(operator, case_name), model)
    assert sum(block.trace.value for block in report.blocks) == pytest.approx(report.trace.value, rel=1e-10)
    assert report.num_matvecs["blocks"] == sum(block.num_matvecs for block in report.blocks)
    assert report.num_matvecs["total"] == sum(v for key, v in report.num_matvecs.items() if key != "total")


def test_user_blocks_by_prefix_name_tensor_and_module_may_overlap() -> None:
    case = make_case("layernorm_ce_mean", torch.float64)
    model = case["model"]
    blocks = {"input": "0.", "norm": [model[1].weight, "1.bias"], "norm_and_head": ["1", model[3]], "all": model}
    report = sharpness(model, case["loss_fn"], case["data"], metrics=("top_k", "trace"), k=2, tol=1e-10,
                       trace_method="exact", blocks=blocks, generator=seeded(0), quiet=True)
    assert [(b.name, b.params) for b in report.blocks] == [
        ("input", ("0.weight", "0.bias")), ("norm", ("1.weight", "1.bias")),
        ("norm_and_head", ("1.weight", "1.bias", "3.weight", "3.bias")),
        ("all", ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")),
    ]
    check_blocks_against(report, reference("hessian", "layernorm_ce_mean"), model)
    assert report.blocks[-1].lambda_max == pytest.approx(float(report.top_k[0]), rel=1e-8)  # the whole model


def test_block_trace_is_exact_up_to_num_matvecs_parameters_and_estimated_above() -> None:
    """cnn_ce_mean: the convolution has 30 parameters, the linear layer 147; 40 products for the trace."""
    case = make_case("cnn_ce_mean", torch.float64)
    model = case["model"]
    report = sharpness(model, case["loss_fn"], case["data"], metrics=("trace",), num_matvecs=40, blocks=True,
                       generator=seeded(0), quiet=True)
    conv, linear = report.blocks
    assert (conv.num_params, linear.num_params) == (30, 147)
    assert conv.trace.std_error == 0 and conv.num_matvecs == conv.trace.num_matvecs == 30
    assert linear.trace.std_error > 0 and linear.num_matvecs == linear.trace.num_matvecs == 40
    assert conv.lambda_max is None and conv.converged is None and "lambda_max" not in conv.to_dict()
    dense = reference("hessian", "cnn_ce_mean")
    for block in report.blocks:
        index = block_index(model, block.params)
        exact = float(dense[index][:, index].trace())
        assert abs(block.trace.value - exact) <= 4 * block.trace.std_error + 1e-10 * abs(exact)


def test_one_block_per_parameter_and_a_selection_by_params() -> None:
    case = make_case("mlp_tanh_ce_mean", torch.float64)
    model = case["model"]
    report = sharpness(model, case["loss_fn"], case["data"], params=["2.weight", "2.bias"], tol=1e-10,
                       trace_method="exact", blocks="parameters", generator=seeded(0), quiet=True)
    assert [(b.name, b.params, b.num_params) for b in report.blocks] == [
        ("2.weight", ("2.weight",), 24), ("2.bias", ("2.bias",), 3)]
    check_blocks_against(report, reference("hessian", "mlp_tanh_ce_mean"), model)
    with pytest.raises(ValueError, match=r"blocks\['first'\] selects only \['0.bias', '0.weight'\], which are not "
                                         r"measured .*params="):
        sharpness(model, case["loss_fn"], case["data"], params=["2.weight"], blocks={"first": "0"}, quiet=True)


def test_a_monte_carlo_fisher_block_is_the_block_of_the_same_draws() -> None:
    """The blocks of a sampled Fisher draw the labels of the full one: each row is exactly its diagonal block."""
    case = make_case("mlp_tanh_ce_mean", torch.float64)
    model = case["model"]
    report = sharpness(model, case["loss_fn"], case["data"], operator="fisher", mc_samples=2, tol=1e-10,
                       trace_method="exact", blocks=True, generator=seeded(7), quiet=True)
    full = curvature.FisherOperator(model, case["loss_fn"], case["data"], mc_samples=2, generator=seeded(7))
    dense = full.to_dense()
    assert report.trace.value == pytest.approx(float(dense.trace()), rel=1e-10)
    check_blocks_against(report, dense, model)


@pytest.mark.parametrize("operator", ["kfac", "ekfac"])
def test_kronecker_factored_blocks_are_their_layers_blocks(operator: str) -> None:
    case = make_case("mlp_tanh_ce_mean", torch.float64)
    model = case["model"]
    report = sharpness(model, case["loss_fn"], case["data"], operator=operator, tol=1e-10, trace_method="exact",
                       blocks=True, generator=seeded(0), quiet=True)
    op = curvature.operators.operator_class(operator)(model, case["loss_fn"], case["data"])
    assert [b.name for b in report.blocks] == ["0", "2"]
    check_blocks_against(report, op.to_dense(), model)
    for block, layer in zip(report.blocks, op.eigh()):
        assert block.lambda_max == pytest.approx(float(layer.eigenvalues.max()), rel=1e-10)


def test_block_table_in_print_dict_json_and_absent_by_default(tmp_path) -> None:
    case = make_case("layernorm_ce_mean", torch.float64)
    report = sharpness(case["model"], case["loss_fn"], case["data"], blocks=True, generator=seeded(0), quiet=True)
    text = str(report)
    assert "\nblocks      3 blocks (table below)" in text and "\nPer block: the Hessian in each block" in text
    table = text.split("Per block")[1].splitlines()
    assert table[1].split() == ["block", "params", "lambda_max", "trace", "products", "seconds"]
    assert [line.split()[0] for line in table[3:]] == ["0", "1", "3", "total"]
    assert table[-1].split()[1:3] == ["63", str(report.num_matvecs["blocks"])]
    data = report.to_dict()
    assert [row["name"] for row in data["blocks"]] == ["0", "1", "3"]
    assert data["blocks"][1] == {
        "name": "1", "params": ["1.weight", "1.bias"], "num_params": 12, "lambda_max": report.blocks[1].lambda_max,
        "residual": report.blocks[1].residual, "converged": True,
        "trace": {"value": report.blocks[1].trace.value, "std_error": 0.0, "num_matvecs": 12},
        "num_matvecs": report.blocks[1].num_matvecs, "seconds": report.blocks[1].seconds,
    }
    assert json.loads(report.to_json(tmp_path / "report.json")) == json.loads(json.dumps(data))
    plain = sharpness(case["model"], case["loss_fn"], case["data"], generator=seeded(0), quiet=True)
    assert plain.blocks == () and "blocks" not in plain.to_dict() and "blocks" not in plain.num_matvecs
    assert "Per block" not in str(plain) and plain.lambda_max == report.lambda_max
    assert sharpness(case["model"], case["loss_fn"], case["data"], generator=seeded(0), quiet=True,
                     blocks=False).blocks == ()


@pytest.mark.parametrize(
    "blocks, error, match",
    [
        ("layers", ValueError, r"blocks must be 'modules' or 'parameters' as a string, got 'layers'"),
        (5, TypeError, r"blocks must be None, True, 'modules', 'parameters' or a mapping"),
        ({}, ValueError, r"blocks is an empty mapping"),
        ({"enc": "encoder"}, ValueError, r"blocks\['enc'\] names 'encoder', which is neither a parameter nor a "
                                         r"module of the model; its modules with parameters are \['0', '1', '3'\]"),
        ({"act": "2"}, ValueError, r"blocks\['act'\] names the module '2' \(Tanh\), which has no parameters"),
        ({"none": []}, ValueError, r"blocks\['none'\] is empty"),
        ({"n": 3}, TypeError, r"blocks\['n'\] must be a parameter or module name"),
        ({"n": [3.0]}, TypeError, r"blocks\['n'\] entries must be parameter or module names"),
        ({"n": torch.zeros(3)}, ValueError, r"blocks\['n'\] holds a tensor that is not a parameter of the model"),
        ({"n": torch.nn.Linear(2, 2)}, ValueError, r"blocks\['n'\] holds a module that is not a submodule"),
        ({1: "0"}, TypeError, r"blocks keys name the blocks and must be non-empty strings, got 1"),
    ],
)
def test_bad_blocks_are_refused_before_any_product(blocks: object, error: type, match: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case("layernorm_ce_mean", torch.float64)
    model = case["model"]
    before = snapshot(model)

    def no_products(self: object, V: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a product was computed before the blocks were checked")

    monkeypatch.setattr(curvature.operators.curvature.CurvatureOperator, "_matmat", no_products)
    with pytest.raises(error, match=match):
        sharpness(model, case["loss_fn"], case["data"], blocks=blocks, quiet=True)
    assert_unchanged(model, before)


def test_blocks_need_lambda_max_or_trace_and_frozen_blocks_are_refused() -> None:
    case = make_case("frozen_ce_sum", torch.float64)
    with pytest.raises(ValueError, match=r"blocks: the per-block table holds lambda_max and the trace .* add "
                                         r"'lambda_max' or 'trace' to metrics"):
        sharpness(case["model"], case["loss_fn"], case["data"], metrics=("density",), blocks=True, quiet=True)
    with pytest.raises(ValueError, match=r"blocks\['w'\] selects only \['0.weight'\], which are not measured "
                                         r"\(frozen, requires_grad=False"):
        sharpness(case["model"], case["loss_fn"], case["data"], blocks={"w": "0.weight"}, quiet=True)
    assert parameter_blocks(case["model"], "modules") == {"0": ("0.bias",), "2": ("2.weight", "2.bias")}
