"""K-FAC and EK-FAC against curvlinops' KFACLinearOperator / EKFACLinearOperator, where both define the same matrix.

curvlinops runs in its own environment (it pulls another torch): CI builds that environment and runs this module
there (``.ci/run``); in the library's environment the module is skipped. The settings compared are those whose
definitions agree (``docs/kronecker.md``, "Differences from curvlinops"): Linear and Conv2d layers, one loss term
per sample (or expand on a position-wise network), no ignored targets or class weights, weight and bias in one
block (curvlinops' ``separate_weight_and_bias=False``), exact damping. Monte-Carlo draws differ between the
libraries, so ``"mc"`` is not compared.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

curvlinops = pytest.importorskip("curvlinops")

import curvature  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def _mlp() -> tuple[nn.Module, list]:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(14, 5)
    return model, [(x[:8], torch.randint(0, 3, (8,))), (x[8:], torch.randint(0, 3, (6,)))]


def _cnn() -> tuple[nn.Module, list]:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(3, 2, 2, dilation=2),
                          nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(7, 2, 7, 7)
    return model, [(x, torch.randint(0, 3, (7,)))]


def _sequence() -> tuple[nn.Module, list]:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 5, 4), torch.randn(6, 5, 3)
    return model, [(x[:4], y[:4]), (x[4:], y[4:])]


PROBLEMS = {
    "mlp_ce_mean": (_mlp, nn.CrossEntropyLoss()),
    "mlp_ce_sum": (_mlp, nn.CrossEntropyLoss(reduction="sum")),
    "cnn_ce_mean": (_cnn, nn.CrossEntropyLoss()),
    "sequence_mse_mean": (_sequence, nn.MSELoss()),
    "sequence_mse_sum": (_sequence, nn.MSELoss(reduction="sum")),
}


def _problem(name: str) -> tuple[nn.Module, nn.Module, list]:
    torch.manual_seed(0)
    factory, loss_fn = PROBLEMS[name]
    model, batches = factory()
    batches = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in batches]
    return model.double(), loss_fn, batches


def _theirs(kind: str, model: nn.Module, loss_fn: nn.Module, batches: list, fisher_type: str) -> torch.Tensor:
    cls = {"kfac": curvlinops.KFACLinearOperator, "ekfac": curvlinops.EKFACLinearOperator}[kind]
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(model, loss_fn, params, batches, check_deterministic=False, fisher_type=fisher_type,
             separate_weight_and_bias=False)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)


@pytest.mark.parametrize("fisher_type", ["ggn", "empirical"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_equal_to_curvlinops(name: str, kind: str, fisher_type: str) -> None:
    """Our dense K-FAC / EK-FAC equals curvlinops' to 1e-6 (float64) on the settings both define alike."""
    model, loss_fn, batches = _problem(name)
    if kind == "ekfac" and name.startswith("sequence"):
        pytest.skip("curvlinops' EK-FAC refuses outputs with more than two dimensions")
    if name == "sequence_mse_mean" and fisher_type == "empirical":
        pytest.skip("a definitional difference: test_empirical_fisher_of_a_mean_over_positions")
    ours = {"kfac": curvature.KFACOperator, "ekfac": curvature.EKFACOperator}[kind](
        model, loss_fn, batches, fisher_type=fisher_type).to_dense()
    theirs = _theirs(kind, model, loss_fn, batches, curvature.operators.kronecker.FISHER_TYPES[fisher_type])
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-6


@pytest.mark.parametrize("name", ["mlp_ce_mean", "cnn_ce_mean"])
def test_damped_inverse_equal_to_curvlinops_exact_damping(name: str) -> None:
    """``inverse(δ)`` equals curvlinops' inverse with ``use_exact_damping=True`` (its default damps the factors)."""
    model, loss_fn, batches = _problem(name)
    params = [p for p in model.parameters() if p.requires_grad]
    theirs = curvlinops.KFACLinearOperator(model, loss_fn, params, batches, check_deterministic=False,
                                           fisher_type="type-2", separate_weight_and_bias=False)
    inverse = curvlinops.KFACInverseLinearOperator(theirs, damping=1e-2, use_exact_damping=True)
    eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    ours = curvature.KFACOperator(model, loss_fn, batches).inverse(1e-2).to_dense()
    expected = inverse @ eye
    assert float((ours - expected).norm() / expected.norm()) < 1e-6


def test_empirical_fisher_of_a_mean_over_positions() -> None:
    r"""For a mean loss over sequences, curvlinops' empirical Fisher is ours times the entries per sample (T C).

    Ours is :math:`\frac1N \sum_n \nabla \ell_n \nabla \ell_n^\top` with :math:`\ell_n` the loss of sample
    :math:`n` alone (as ``EmpiricalFisherOperator``); curvlinops treats every position as a loss term and rescales
    the gradients by the number of terms, which multiplies the matrix by :math:`T C` (15 here).
    """
    model, loss_fn, batches = _problem("sequence_mse_mean")
    ours = curvature.KFACOperator(model, loss_fn, batches, fisher_type="empirical").to_dense()
    theirs = _theirs("kfac", model, loss_fn, batches, "empirical")
    entries = batches[0][1][0].numel()
    assert float((entries * ours - theirs).norm() / theirs.norm()) < 1e-10
