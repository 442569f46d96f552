"""No silent wrong numbers from the operators: gradient-disabled modes, batch-dependent models and losses, data that
changes between passes, ambiguous batches, and the errors that must name their cause.

Each class of defect is tested over the case registry where the registry can express it, and every test failed on
the code before the fix (commit 81ec11d).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import FACTORIES, counted_tokens, make_case, shifted_lm_loss
from helpers import OPERATORS, assert_unchanged, operator_cases, reference, rel_err, snapshot
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset

import curvature
from curvature.operators.data import Data
from curvature.operators.losses import mean_count

PAIRS = pytest.mark.parametrize("kind, case_name", operator_cases())
MULTI_BATCH = sorted(name for name in FACTORIES if not Data(make_case(name)["data"]).single)


def _build(kind: str, case: dict, **kwargs):
    return OPERATORS[kind][0](case["model"], case["loss_fn"], case["data"], **kwargs)


def _probes(size: int, k: int) -> torch.Tensor:
    return torch.randn(size, k, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


# -- gradient-disabled modes -------------------------------------------------------------------------------------
@PAIRS
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_products_under_gradient_disabled_modes_are_exact(kind: str, case_name: str, mode: str) -> None:
    """Built and multiplied under inference mode (or no_grad): the products of the operator built outside it.

    Before the fix, GGN, Fisher and empirical-Fisher products over a loader came out as zeros under inference mode
    (the forward-mode path recorded nothing), and single-batch operators raised about `.detach()`.
    """
    case = make_case(case_name)
    before = snapshot(case["model"])
    V = _probes(sum(p.numel() for p in case["model"].parameters() if p.requires_grad), 2)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    expected = _build(kind, case, keep_graph=False) @ V
    with context():
        op = _build(kind, case, keep_graph=False)
        columns, column = op @ V, op @ V[:, 0]
        kept = _build(kind, case, keep_graph=True) @ V
    assert rel_err(columns, expected) <= 1e-12
    assert rel_err(column, expected[:, 0]) <= 1e-12
    assert rel_err(kept, expected) <= 1e-12
    assert not columns.is_inference()
    assert_unchanged(case["model"], before)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_eigenvalues_under_inference_mode(kind: str) -> None:
    """The reported symptom: λ_max = 0 "converged" under inference mode over a loader."""
    case = make_case("loader_uneven_ce_mean")
    truth = float(torch.linalg.eigvalsh(reference(kind, case["name"]))[-1])
    with torch.inference_mode():
        op = _build(kind, case)
        result = curvature.eigenvalues(op, k=1, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert abs(float(result.values[0]) - truth) <= 1e-6 * truth


def test_data_made_under_inference_mode() -> None:
    """Inputs and targets created under inference mode (a preprocessing pass) are constants like any others."""
    case = make_case("layernorm_ce_mean")
    with torch.inference_mode():
        x, y = (t.clone() for t in case["data"])
    assert x.is_inference()
    op = curvature.HessianOperator(case["model"], case["loss_fn"], (x, y))
    assert rel_err(op.to_dense(), reference("hessian", case["name"])) <= 1e-10


def test_model_made_under_inference_mode_is_refused() -> None:
    with torch.inference_mode():
        model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="inference_mode"):
        curvature.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))


def test_detached_loss_message_names_inference_mode() -> None:
    """A loss that cannot be differentiated because of inference mode inside it says so."""

    class InferenceInside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return self.fc(x)

    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    op = curvature.HessianOperator(InferenceInside().double(), nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="inference_mode"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


# -- samples that depend on their batch ----------------------------------------------------------------------------
class BatchMixing(nn.Module):
    """Wraps a model and adds to every sample's outputs the batch mean of the outputs (batch statistics)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        return out + 0.5 * out.mean(0, keepdim=True)


@pytest.mark.parametrize("case_name", sorted(FACTORIES))
def test_batch_dependent_model(case_name: str) -> None:
    """Over several batches the curvature of a batch-mixing model depends on the batching: refused. Over one batch
    it is the curvature of that batch's loss as written, which the dense reference of the same batch confirms."""
    case = make_case(case_name)
    model = BatchMixing(case["model"])
    if case_name in MULTI_BATCH:
        with pytest.raises(ValueError, match="depend on the other samples of its batch"):
            curvature.GGNOperator(model, case["loss_fn"], case["data"])
        return
    op = curvature.HessianOperator(model, case["loss_fn"], case["data"])
    expected = curvature.reference.hessian_matrix(model, case["loss_fn"], case["data"])
    assert rel_err(op.to_dense(), expected) <= 1e-10


@pytest.mark.parametrize("data", ["single", "loader"])
def test_batchnorm_without_running_statistics_is_refused(data: str) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3)).double()
    model.eval()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    batches = (x, y) if data == "single" else DataLoader(TensorDataset(x, y), batch_size=8)
    before = snapshot(model)
    for cls, _ in OPERATORS.values():
        with pytest.raises(ValueError, match="track_running_stats=False"):
            cls(model, nn.CrossEntropyLoss(), batches)
    assert_unchanged(model, before)


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(1, 3), lambda: nn.InstanceNorm1d(3, affine=True)])
def test_per_sample_normalization_is_batching_independent(norm) -> None:
    """GroupNorm and InstanceNorm normalize each sample alone: accepted over a loader, equal to the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), norm(), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)).double().eval()
    x, y = torch.randn(20, 2, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    op = curvature.GGNOperator(model, nn.CrossEntropyLoss(), DataLoader(TensorDataset(x, y), batch_size=6))
    assert rel_err(op.to_dense(), curvature.reference.ggn(model, nn.CrossEntropyLoss(), (x, y))) <= 1e-10


# -- losses that average over something other than samples ---------------------------------------------------------
@pytest.mark.parametrize("case_name", MULTI_BATCH)
def test_callable_loss_is_exact_or_refused(case_name: str) -> None:
    """Every registry loss written as a plain callable: the operator over the case's batches is the reference or is
    refused by name; never silently off. Reporting the count with NormalizedLoss makes it exact."""
    case = make_case(case_name)
    loss, reduction = case["loss_fn"], case.get("reduction") or getattr(case["loss_fn"], "reduction", "mean")

    def plain(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss(outputs, targets)

    truth = reference("ggn", case_name)
    try:
        op = curvature.GGNOperator(case["model"], plain, case["data"], reduction=reduction)
        dense = op.to_dense()
    except ValueError as err:
        assert "NormalizedLoss" in str(err)
    else:
        assert rel_err(dense, truth) <= 1e-10
    if reduction == "mean":
        kind = "ce" if isinstance(loss, nn.CrossEntropyLoss) else "mse" if isinstance(loss, nn.MSELoss) else None
        if kind is not None:
            count = lambda z, y: mean_count(kind, loss, y, None, z)  # noqa: E731
        else:  # the registry's other losses: a token count of their own, or a mean over samples
            count = getattr(loss, "normalizer", lambda z, y: z.shape[0])
        counted = curvature.NormalizedLoss(plain, count)
        assert rel_err(curvature.GGNOperator(case["model"], counted, case["data"]).to_dense(), truth) <= 1e-10


def _lm_batches(padded_first: bool = True) -> tuple[nn.Module, list]:
    case = make_case("lm_shifted_tokens_mean")
    tokens = torch.cat([b[0] for b in case["data"]])
    labels = torch.cat([b[1] for b in case["data"]])
    if not padded_first:  # the first batch unpadded: only later batches can reveal the token weighting
        labels[:4] = tokens[:4]
    return case["model"], [(tokens[i:i + 3], labels[i:i + 3]) for i in range(0, 12, 3)]


def test_language_model_loss_over_padded_batches() -> None:
    """The reported case: a shifted LM cross-entropy over four differently padded batches was 22% off, silently."""
    model, batches = _lm_batches()
    with pytest.raises(ValueError, match="NormalizedLoss"):
        curvature.HessianOperator(model, shifted_lm_loss, batches, reduction="mean")
    counted = curvature.NormalizedLoss(shifted_lm_loss, counted_tokens)
    one = curvature.HessianOperator(model, counted, (torch.cat([b[0] for b in batches]),
                                                     torch.cat([b[1] for b in batches]))).to_dense()
    assert rel_err(curvature.HessianOperator(model, counted, batches).to_dense(), one) <= 1e-12


def test_later_batch_with_other_weighting_is_caught_in_the_first_product() -> None:
    """The first batch is unpadded (its halves agree); a later padded batch shows the loss is a token mean."""
    model, batches = _lm_batches(padded_first=False)
    op = curvature.HessianOperator(model, shifted_lm_loss, batches, reduction="mean", keep_graph=False)
    with pytest.raises(ValueError, match="batch [123] of data.*NormalizedLoss"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_normalizer_must_be_a_count() -> None:
    model, batches = _lm_batches()
    with pytest.raises(ValueError, match="normalizer returned -"):
        curvature.HessianOperator(model, curvature.NormalizedLoss(shifted_lm_loss, lambda z, y: -1.0), batches)
    with pytest.raises(TypeError, match="normalizer must be callable"):
        curvature.NormalizedLoss(shifted_lm_loss, 3)


# -- data that must be one fixed set --------------------------------------------------------------------------------
def _loader_case(**kwargs) -> tuple[nn.Module, nn.Module, DataLoader]:
    case = make_case("loader_uneven_ce_mean")
    dataset = case["data"].dataset
    return case["model"], case["loss_fn"], DataLoader(dataset, batch_size=7, **kwargs)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_shuffled_loader_with_drop_last_is_refused(kind: str) -> None:
    model, loss_fn, loader = _loader_case(shuffle=True, drop_last=True)  # 30 samples: 2 dropped per pass
    with pytest.raises(ValueError, match="shuffle=False.*drop_last=False"):
        OPERATORS[kind][0](model, loss_fn, loader)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_shuffled_loader_without_a_remainder_is_exact(kind: str) -> None:
    model, loss_fn, loader = _loader_case(shuffle=True)
    op = OPERATORS[kind][0](model, loss_fn, loader)
    assert rel_err(op.to_dense(), reference(kind, "loader_uneven_ce_mean")) <= 1e-10


def test_random_samplers_and_augmentation_are_refused() -> None:
    model, loss_fn, loader = _loader_case()
    dataset = loader.dataset
    with pytest.raises(ValueError, match="with replacement"):
        curvature.HessianOperator(model, loss_fn, DataLoader(dataset, batch_size=7,
                                                             sampler=RandomSampler(dataset, replacement=True)))

    class Augmented(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int):
            x, y = dataset[i]
            return x + 0.01 * torch.randn_like(x), y

    with pytest.raises(ValueError, match="different first batch"):
        curvature.HessianOperator(model, loss_fn, DataLoader(Augmented(), batch_size=7))
    with pytest.raises(ValueError, match="shuffle=False"):
        curvature.FisherOperator(model, loss_fn, DataLoader(dataset, batch_size=6, shuffle=True), mc_samples=2)


def test_one_shot_iterable_is_refused() -> None:
    model, loss_fn, loader = _loader_case()
    samples = list(loader.dataset)

    class Once(IterableDataset):
        def __init__(self) -> None:
            self.stream = iter(samples)

        def __iter__(self):
            return self.stream

    with pytest.raises(ValueError, match="second pass"):
        curvature.HessianOperator(model, loss_fn, DataLoader(Once(), batch_size=7))

    class OneBatchOnce:
        def __init__(self) -> None:
            self.used = False

        def __iter__(self):
            if not self.used:
                self.used = True
                yield (samples[0][0][None], samples[0][1][None])

    with pytest.raises(ValueError, match="once and nothing on a second pass"):
        curvature.HessianOperator(model, loss_fn, OneBatchOnce())


# -- batches without targets, ambiguous lists -----------------------------------------------------------------------
def test_batches_without_targets() -> None:
    case = make_case("mlp_tanh_ce_mean")
    x = case["data"][0]

    def energy(outputs: torch.Tensor, targets: None) -> torch.Tensor:
        assert targets is None
        return torch.logsumexp(outputs, 1).mean()

    ref = curvature.reference.hessian_matrix(case["model"], energy, (x, None))
    for data in [(x, None), [(x[:10], None), (x[10:], None)]]:
        assert rel_err(curvature.HessianOperator(case["model"], energy, data).to_dense(), ref) <= 1e-10


def test_ambiguous_list_of_two_tensors_warns() -> None:
    case = make_case("mlp_tanh_ce_mean")
    x = case["data"][0]

    def energy(outputs: torch.Tensor, targets: object) -> torch.Tensor:
        return outputs.pow(2).mean()

    with pytest.warns(UserWarning, match=r"read as ONE \(inputs, targets\) pair.*\(x1, None\)"):
        curvature.HessianOperator(case["model"], energy, [x[:12], x[12:]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tuple is a pair, and a pair of different kinds is unambiguous
        curvature.HessianOperator(case["model"], energy, (x[:12], x[12:]))
        curvature.HessianOperator(case["model"], case["loss_fn"], list(case["data"]))


# -- errors that name their cause -------------------------------------------------------------------------------------
@PAIRS
def test_nan_in_the_vector_is_blamed_on_the_vector(kind: str, case_name: str) -> None:
    op = _build(kind, make_case(case_name))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    v[-1] = float("nan")
    with pytest.raises(ValueError, match="vector multiplied.*NaN"):
        op @ v
    assert op.num_matvecs == 0


def test_model_converted_after_building() -> None:
    case = make_case("mlp_tanh_ce_mean")
    op = curvature.HessianOperator(case["model"], case["loss_fn"], case["data"])
    case["model"].float()
    with pytest.raises(ValueError, match="now torch.float32.*build a new operator"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("keep_graph", [True, False])
def test_later_batch_that_does_not_fit_names_the_batch(kind: str, keep_graph: bool) -> None:
    case = make_case("mlp_tanh_ce_mean")
    x, y = case["data"]
    batches = [(x[:12], y[:12]), (x[12:], y[12:]), (torch.randn(4, 7, dtype=torch.float64), y[:4])]
    op = OPERATORS[kind][0](case["model"], case["loss_fn"], batches, keep_graph=keep_graph)
    with pytest.raises(ValueError, match=r"batch 2 of data does not fit the model.*mat1 and mat2"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_params_accepts_modules_and_named_parameters() -> None:
    case = make_case("mlp_tanh_ce_mean")
    model = case["model"]
    expected = ["2.weight", "2.bias"]
    for params in (model[2], model[2].parameters(), model[2].named_parameters(), ["2.weight", "2.bias"]):
        assert curvature.GGNOperator(model, case["loss_fn"], case["data"], params=params).param_names == expected
    with pytest.raises(TypeError, match="model.fc.parameters"):
        curvature.GGNOperator(model, case["loss_fn"], case["data"], params=[3])


def test_integer_loss_is_refused_at_construction() -> None:
    case = make_case("mlp_tanh_ce_mean")
    with pytest.raises(TypeError, match="floating-point loss"):
        curvature.HessianOperator(case["model"], lambda z, y: (z.argmax(1) == y).sum(), case["data"])
