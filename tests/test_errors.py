"""Bad input is refused before any work, with a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from helpers import OPERATORS, assert_unchanged, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvature

ALL = [cls for cls, _ in OPERATORS.values()]


@pytest.fixture
def mlp() -> dict:
    return make_case("mlp_tanh_ce_mean")


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def _mlp_with(*extra: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 8), *extra, nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda: _mlp_with(nn.Dropout(0.1)), "drops units at random.*model.eval"),
        (lambda: _mlp_with(nn.BatchNorm1d(8)), "running statistics.*model.eval"),
        (lambda: _mlp_with(Noisy()), "draws random numbers"),
        (lambda: _mlp_with(Counting()), "modifies its parameters or buffers"),
    ],
)
def test_stochastic_or_stateful_model_refused(cls, make_model, message: str, mlp: dict) -> None:
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        cls(model, mlp["loss_fn"], mlp["data"])
    assert_unchanged(model, before)  # refused without a trace: mode, buffers and RNG as they were


def test_train_mode_without_random_layers_is_fine(mlp: dict) -> None:
    model = _mlp_with(nn.Dropout(0.0))
    assert model.training
    curvature.HessianOperator(model, mlp["loss_fn"], mlp["data"])


@pytest.mark.parametrize("cls", ALL)
def test_non_scalar_loss(cls, mlp: dict) -> None:
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        cls(mlp["model"], nn.CrossEntropyLoss(reduction="none"), mlp["data"])
    if cls is curvature.FisherOperator:
        return
    with pytest.raises(ValueError, match="scalar"):
        cls(mlp["model"], lambda z, y: (z - 0).sum(1), mlp["data"], reduction="mean")


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "data, error, message",
    [
        ([], ValueError, "empty"),
        (DataLoader(TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)), batch_size=4), ValueError,
         "empty"),
        ((x for x in []), TypeError, "one-shot iterator"),
        (TensorDataset(torch.zeros(4, 5)), TypeError, "DataLoader"),
        (42, TypeError, "iterable"),
        ([(torch.zeros(2, 5),)], TypeError, r"\(inputs, targets\) pair"),
    ],
)
def test_bad_data(cls, data, error, message: str, mlp: dict) -> None:
    with pytest.raises(error, match=message):
        cls(mlp["model"], mlp["loss_fn"], data)


@pytest.mark.parametrize("cls", ALL)
def test_targets_that_do_not_match(cls, mlp: dict) -> None:
    model, (x, y) = mlp["model"], mlp["data"]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cls(model, mlp["loss_fn"], (x, y + 5))
    with pytest.raises(ValueError, match="expected targets of shape"):
        cls(model, mlp["loss_fn"], (x, y[:, None]))
    with pytest.raises(ValueError, match="broadcast"):
        cls(model, nn.MSELoss(), (x, torch.randn(24, dtype=torch.float64)))


@pytest.mark.parametrize("cls", ALL)
def test_nan_in_loss_is_refused_before_work(cls, mlp: dict) -> None:
    x, y = mlp["data"]
    x = x.clone()
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cls(mlp["model"], mlp["loss_fn"], (x, y))


@pytest.mark.parametrize("cls", ALL)
def test_nan_in_a_later_batch_is_refused_in_the_product(cls, mlp: dict) -> None:
    x, y = mlp["data"]
    bad = x[12:].clone()
    bad[0, 0] = float("inf")
    op = cls(mlp["model"], mlp["loss_fn"], [(x[:12], y[:12]), (bad, y[12:])])
    with pytest.raises(ValueError, match="curvature product contains NaN or Inf"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("cls", ALL)
def test_mixed_dtypes(cls, mlp: dict) -> None:
    x, y = mlp["data"]
    with pytest.raises(TypeError, match="inputs have dtype torch.float32"):
        cls(mlp["model"], mlp["loss_fn"], (x.float(), y))
    model = _mlp_with()
    model[0].float()
    with pytest.raises(TypeError, match="mixed dtypes"):
        cls(model, mlp["loss_fn"], mlp["data"])


@pytest.mark.parametrize(
    "params, error, message",
    [
        (["0.weight", "nope.weight"], ValueError, "not a parameter"),
        (["0.weight", "0.weight"], ValueError, "twice"),
        ([], ValueError, "empty"),
        ("0.weight", TypeError, "iterable"),
        ([torch.zeros(3, requires_grad=True)], ValueError, "not a parameter"),
        ([3], TypeError, "names or tensors"),
    ],
)
def test_bad_params(params, error, message: str, mlp: dict) -> None:
    with pytest.raises(error, match=message):
        curvature.HessianOperator(mlp["model"], mlp["loss_fn"], mlp["data"], params=params)


def test_frozen_param_named(mlp: dict) -> None:
    mlp["model"][0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        curvature.GGNOperator(mlp["model"], mlp["loss_fn"], mlp["data"], params=["0.bias"])
    for p in mlp["model"].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        curvature.GGNOperator(mlp["model"], mlp["loss_fn"], mlp["data"])


def test_wrong_vector_for_a_curvature_operator(mlp: dict) -> None:
    H = curvature.HessianOperator(mlp["model"], mlp["loss_fn"], mlp["data"])
    assert H.shape == (75, 75)
    with pytest.raises(ValueError, match=r"needs \(75,\) or \(75, k\)"):
        H @ torch.ones(58, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        H @ torch.ones(75)
    assert H.num_matvecs == 0


def test_fisher_needs_a_likelihood(mlp: dict) -> None:
    with pytest.raises(TypeError, match="negative log-likelihood"):
        curvature.FisherOperator(mlp["model"], lambda z, y: (z**2).mean(), mlp["data"])
    with pytest.raises(ValueError, match="weight"):
        curvature.FisherOperator(mlp["model"], nn.CrossEntropyLoss(weight=torch.ones(3).double()), mlp["data"])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="mc_samples"):
            curvature.FisherOperator(mlp["model"], mlp["loss_fn"], mlp["data"], mc_samples=bad)
    with pytest.raises(TypeError, match="torch.Generator"):
        curvature.FisherOperator(mlp["model"], mlp["loss_fn"], mlp["data"], mc_samples=2, generator=3)


def test_reduction_checks(mlp: dict) -> None:
    with pytest.raises(ValueError, match="contradicts"):
        curvature.HessianOperator(mlp["model"], mlp["loss_fn"], mlp["data"], reduction="sum")
    x, y = mlp["data"]

    def odd(z, t):
        return nn.functional.cross_entropy(z, t) ** 2

    with pytest.raises(ValueError, match="neither the mean nor the sum"):
        curvature.HessianOperator(mlp["model"], odd, [(x[:5], y[:5]), (x[5:], y[5:])])
    ones = [(x[i:i + 1], y[i:i + 1]) for i in range(3)]
    with pytest.raises(ValueError, match="pass reduction="):
        curvature.HessianOperator(mlp["model"], lambda z, t: nn.functional.cross_entropy(z, t), ones)
    curvature.HessianOperator(mlp["model"], lambda z, t: nn.functional.cross_entropy(z, t), ones, reduction="sum")


def test_model_and_loss_types(mlp: dict) -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        curvature.HessianOperator(lambda x: x, mlp["loss_fn"], mlp["data"])
    with pytest.raises(TypeError, match="callable"):
        curvature.HessianOperator(mlp["model"], "mse", mlp["data"])


def test_weighted_label_smoothed_ce_refused_by_ggn_at_construction(mlp: dict) -> None:
    loss_fn = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64), label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        curvature.GGNOperator(mlp["model"], loss_fn, mlp["data"])
    curvature.HessianOperator(mlp["model"], loss_fn, mlp["data"])  # the Hessian needs no closed form


class IntOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 10).long()


def test_more_bad_input(mlp: dict) -> None:
    model, (x, y), loss_fn = mlp["model"], mlp["data"], mlp["loss_fn"]
    with pytest.raises(TypeError, match="floating-point outputs"):
        curvature.HessianOperator(nn.Sequential(model, IntOutputs()), lambda z, t: z.sum(), (x, y))
    with pytest.raises(TypeError, match="targets.long"):
        curvature.GGNOperator(model, loss_fn, (x, y.int()))
    with pytest.raises(TypeError, match="scalar tensor, got float"):
        curvature.HessianOperator(model, lambda z, t: 1.0, (x, y), reduction="mean")
    with pytest.raises(ValueError, match="holds no samples"):
        curvature.HessianOperator(model, loss_fn, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="every target of the first batch is ignored"):
        curvature.HessianOperator(model, loss_fn, (x, torch.full_like(y, -100)))
    with pytest.raises(TypeError, match="keep_graph must be"):
        curvature.HessianOperator(model, loss_fn, (x, y), keep_graph="no")
    H = curvature.HessianOperator(model, loss_fn, (x, y))
    with pytest.raises(ValueError, match="finite"):
        H * float("nan")


def test_detached_loss_is_refused(mlp: dict) -> None:
    model, data = mlp["model"], mlp["data"]
    for cls in (curvature.HessianOperator, curvature.GGNOperator):
        op = cls(model, lambda z, t: nn.functional.cross_entropy(z.detach(), t), data)
        with pytest.raises(ValueError, match="not depend on the"):
            op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_data_shapes_are_explained(mlp: dict) -> None:
    model, (x, y), loss_fn = mlp["model"], mlp["data"], mlp["loss_fn"]
    with pytest.raises(TypeError, match="tuple of 3 tensors"):
        curvature.HessianOperator(model, loss_fn, (x, y, torch.ones(24)))


def test_structured_targets_and_tied_aliases() -> None:
    from cases import make_case

    case = make_case("tied_dict_inputs_ce_sum")
    model = case["model"]
    H = curvature.HessianOperator(model, case["loss_fn"], case["data"], params=["second.weight"])
    assert H.param_names == ["first.weight"]  # the tied weight's second name means its first

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    targets = (torch.randn(10, 2, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64))

    def two_heads(z, t):
        return ((z[:, :2] - t[0]) ** 2).mean() + ((z[:, 2:] - t[1]) ** 2).mean()

    op = curvature.HessianOperator(mlp, two_heads, (x, targets))
    ref = curvature.reference.hessian_matrix(mlp, two_heads, (x, targets))
    assert float((op.to_dense() - ref).norm() / ref.norm()) <= 1e-10
