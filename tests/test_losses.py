"""The loss objects against each other and against their definitions, over the case registry's closed-form losses."""

from __future__ import annotations

import pytest
import torch
from cases import FACTORIES, make_case
from helpers import OPERATORS, reference, rel_err, seeded

import curvature
from curvature.operators.data import Data
from curvature.operators.losses import LOSSES, factor_product, loss_for, loss_kind, mean_count

CLOSED_FORM = [name for name in sorted(FACTORIES) if loss_for(make_case(name)["loss_fn"]).kind != "other"]
LIKELIHOOD = [name for name in CLOSED_FORM if make_case(name)["likelihood"]]


def _first_batch(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached outputs and the targets of the case's first batch."""
    inputs, targets = next(iter(Data(case["data"])))
    model = case["model"]
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs), targets
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs), targets


def test_every_registered_loss_has_a_case() -> None:
    kinds = {loss_kind(make_case(name)["loss_fn"]) for name in CLOSED_FORM}
    assert kinds == {cls.kind for cls in LOSSES}


@pytest.mark.parametrize("case_name", CLOSED_FORM)
def test_output_hessian_square_root(case_name: str) -> None:
    """sum_j S_j <S_j, U>_unit is the output Hessian's product, for the mean and the sum."""
    case = make_case(case_name)
    loss = loss_for(case["loss_fn"])
    outputs, targets = _first_batch(case)
    U = torch.randn(3, *outputs.shape, dtype=outputs.dtype, generator=seeded(0))
    for reduction in ("mean", "sum"):
        S = loss.output_hessian_sqrt(outputs, targets, reduction)
        assert S.shape[1:] == outputs.shape
        expected = loss.output_hessian(outputs, targets, reduction)(U)
        assert rel_err(factor_product(S, loss.unit_dims)(U), expected) <= 1e-12


@pytest.mark.parametrize("case_name", LIKELIHOOD)
def test_sampled_gradients_are_unbiased(case_name: str) -> None:
    """E[g <g, U>_sample] is the summed loss's output Hessian times U: the mean of 4000 draws lies within five
    standard errors of it, entry by entry."""
    case = make_case(case_name)
    loss = loss_for(case["loss_fn"])
    outputs, targets = _first_batch(case)
    n = outputs.shape[0]
    U = torch.randn(2, *outputs.shape, dtype=outputs.dtype, generator=seeded(1))
    g = loss.sampled_output_gradients(outputs, targets, 4000, seeded(2)).reshape(4000, n, -1)
    inner = torch.einsum("mnd,knd->mkn", g, U.reshape(2, n, -1))
    draws = inner.unsqueeze(-1) * g.unsqueeze(1)  # (M, k, N, D): one unbiased estimate of Lambda U per draw
    mean, std_error = draws.mean(0), draws.std(0) / 4000**0.5
    exact = loss.output_hessian(outputs, targets, "sum")(U).reshape(mean.shape)
    assert bool(((mean - exact).abs() <= 5 * std_error + 1e-12).all())


@pytest.mark.parametrize("case_name", [name for name in LIKELIHOOD if loss_kind(make_case(name)["loss_fn"]) == "bce"])
def test_mc_fisher_of_bce_is_unbiased(case_name: str) -> None:
    """The average of 20 Monte-Carlo Fisher operators (20 draws each) lies within five standard errors of the
    exact Fisher, the dense reference."""
    case = make_case(case_name)
    exact = reference("fisher", case_name)
    gen = seeded(0)
    V = torch.randn(exact.shape[0], 2, dtype=torch.float64, generator=gen)
    products = torch.stack([OPERATORS["fisher"][0](case["model"], case["loss_fn"], case["data"], mc_samples=20,
                                                   generator=gen) @ V for _ in range(20)])
    mean, std_error = products.mean(0), products.std(0) / 20**0.5
    assert bool(((mean - exact @ V).abs() <= 5 * std_error + 1e-12).all())


@pytest.mark.parametrize("case_name", CLOSED_FORM)
def test_string_interface_is_the_objects(case_name: str) -> None:
    """The kind-string functions the operators call forward to the loss object of that kind."""
    case = make_case(case_name)
    loss = loss_for(case["loss_fn"])
    outputs, targets = _first_batch(case)
    assert mean_count(loss.kind, case["loss_fn"], targets, None, outputs) == loss.mean_count(targets, None, outputs)


def test_bce_refusals() -> None:
    """Targets that do not fit the logits, and a reweighted BCE for the Fisher, are refused by name."""
    case = make_case("bce_2d_logits_sum")
    model, loss_fn = case["model"], case["loss_fn"]
    x, y = next(iter(case["data"]))
    with pytest.raises(ValueError, match=r"targets of shape \(8,\) do not match logits of shape \(8, 3\)"):
        curvature.GGNOperator(model, loss_fn, (x, y[:, 0]))
    with pytest.raises(TypeError, match="use targets.to"):
        curvature.GGNOperator(model, loss_fn, (x, y.float()))
    for option in ("weight", "pos_weight"):
        weighted = torch.nn.BCEWithLogitsLoss(**{option: torch.ones(3, dtype=torch.float64)})
        assert curvature.GGNOperator(model, weighted, (x, y)).is_psd
        with pytest.raises(ValueError, match=f"{option}= is not a likelihood"):
            curvature.FisherOperator(model, weighted, (x, y))
    negative = torch.nn.BCEWithLogitsLoss(weight=-torch.ones(3, dtype=torch.float64))
    assert not curvature.GGNOperator(model, negative, (x, y)).is_psd
    with pytest.raises(ValueError, match="weight of shape \\(2,\\) does not broadcast"):
        curvature.GGNOperator(model, torch.nn.BCEWithLogitsLoss(weight=torch.ones(2, dtype=torch.float64)), (x, y))
