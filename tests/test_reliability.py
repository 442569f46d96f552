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


def test_batchnorm_without_running_statistics() -> None:
    """It normalizes every batch with that batch's statistics, in eval mode too: refused by name over several
    batches; over one batch the curvature of that batch's loss as written, which the reference confirms."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3)).double()
    model.eval()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    before = snapshot(model)
    for cls, _ in OPERATORS.values():
        with pytest.raises(ValueError, match="track_running_stats=False"):
            cls(model, nn.CrossEntropyLoss(), [(x[:8], y[:8]), (x[8:], y[8:])])
    assert_unchanged(model, before)
    H = curvature.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    assert rel_err(H.to_dense(), curvature.reference.hessian_matrix(model, nn.CrossEntropyLoss(), (x, y))) <= 1e-10


def test_sequence_first_models_and_models_that_need_whole_batches() -> None:
    """Sequence-first inputs look like samples that depend on their batch (nothing tells the two apart, and
    accepting a batch-mixing model would be silently wrong): refused over several batches with the fix named,
    exact over one. A model that cannot take half a batch cannot be checked: accepted, not refused."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=8, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False), nn.Linear(4, 2))
    model = model.double().eval()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randn(5, 6, 2, dtype=torch.float64)  # (S, N, E)
    with pytest.raises(ValueError, match="batch_first=True"):
        curvature.GGNOperator(model, nn.MSELoss(reduction="sum"), [(x[:, :4], y[:, :4]), (x[:, 4:], y[:, 4:])])
    op = curvature.GGNOperator(model, nn.MSELoss(reduction="sum"), (x, y))
    assert rel_err(op.to_dense(), curvature.reference.ggn(model, nn.MSELoss(reduction="sum"), (x, y))) <= 1e-10

    class WholeBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(4, -1))  # a hard-coded batch size

    data = [(torch.randn(4, 2, 3, dtype=torch.float64), torch.randint(0, 2, (4,))) for _ in range(2)]
    curvature.GGNOperator(WholeBatch().double(), nn.CrossEntropyLoss(), data)


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


def test_token_weighting_is_seen_in_float32() -> None:
    """Near initialization every token's loss is about the same, so loss values could not tell a token mean from a
    sample mean in float32 (a GGN 15% off was accepted); the gradients in the outputs can."""
    torch.manual_seed(0)
    model = make_case("lm_shifted_tokens_mean", torch.float32)["model"]
    with torch.no_grad():  # near-uniform predictions, as in a fresh language model
        model.head.weight.mul_(1e-3)
        model.head.bias.zero_()
    tokens = torch.randint(0, 7, (4, 12))
    labels = tokens.clone()
    labels[2:, 3:] = -100  # the halves of the batch hold 22 and 4 tokens
    with pytest.raises(ValueError, match="NormalizedLoss"):
        curvature.GGNOperator(model, shifted_lm_loss, [(tokens, labels), (tokens, labels)], reduction="mean")


def test_outputs_per_sample_that_change_between_batches() -> None:
    """Batches of sequences of 2 and of 9 tokens: a custom token mean weighted by samples was 7% off, and no split
    of one batch can see it. Refused unless the count is reported; a torch.nn loss that averages over entries is
    counted by entries and exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    short, long_ = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 9, 3, dtype=torch.float64)
    targets = [torch.rand(5, 2, 2, dtype=torch.float64).round(), torch.rand(5, 9, 2, dtype=torch.float64).round()]
    batches = [(short, targets[0]), (long_, targets[1])]

    def token_mean(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(z, t)

    op = curvature.HessianOperator(model, token_mean, batches, reduction="mean", keep_graph=False)
    with pytest.raises(ValueError, match="per sample where the first batch had.*NormalizedLoss"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    counted = curvature.NormalizedLoss(token_mean, lambda z, t: z.numel())
    bce = nn.BCEWithLogitsLoss()
    H_counted = curvature.HessianOperator(model, counted, batches).to_dense()
    H_torch = curvature.HessianOperator(model, bce, batches).to_dense()
    # The truth: the mean over every entry of both batches, by hand (the batches cannot be concatenated).
    flat = (torch.cat([short.reshape(-1, 3), long_.reshape(-1, 3)]), torch.cat([t.reshape(-1, 2) for t in targets]))
    truth = curvature.reference.hessian_matrix(model, bce, flat)
    assert rel_err(H_counted, truth) <= 1e-10 and rel_err(H_torch, truth) <= 1e-10


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


class Augmented(torch.utils.data.Dataset):
    """A data set with a random transform: noise added to every input at every read."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x + 0.01 * torch.randn_like(x), y


def test_random_samplers_and_augmentation_are_refused() -> None:
    model, loss_fn, loader = _loader_case()
    dataset = loader.dataset
    with pytest.raises(ValueError, match="with replacement"):
        curvature.HessianOperator(model, loss_fn, DataLoader(dataset, batch_size=7,
                                                             sampler=RandomSampler(dataset, replacement=True)))
    with pytest.raises(ValueError, match="different first batch"):
        curvature.HessianOperator(model, loss_fn, DataLoader(Augmented(dataset), batch_size=7))
    with pytest.raises(ValueError, match="shuffle=False"):
        curvature.FisherOperator(model, loss_fn, DataLoader(dataset, batch_size=6, shuffle=True), mc_samples=2)


def test_shuffled_loader_with_random_augmentation_is_refused() -> None:
    """The usual training loader: shuffled, with a random transform. Two products of one vector differed by 21%."""
    model, loss_fn, loader = _loader_case()
    with pytest.raises(ValueError, match="different sample 0 when read twice"):
        curvature.HessianOperator(model, loss_fn, DataLoader(Augmented(loader.dataset), batch_size=7, shuffle=True))


def test_batch_samplers() -> None:
    """drop_last given through an explicit BatchSampler is read there; a custom batch sampler without .sampler (a
    list of index lists) is fine and exact."""
    model, loss_fn, loader = _loader_case()
    dataset = loader.dataset
    sampler = torch.utils.data.BatchSampler(RandomSampler(dataset), batch_size=7, drop_last=True)
    with pytest.raises(ValueError, match="drop_last=True"):
        curvature.GGNOperator(model, loss_fn, DataLoader(dataset, batch_sampler=sampler))
    buckets = [list(range(0, 11)), list(range(11, 30))]
    op = curvature.GGNOperator(model, loss_fn, DataLoader(dataset, batch_sampler=buckets))
    assert rel_err(op.to_dense(), reference("ggn", "loader_uneven_ce_mean")) <= 1e-10


def test_data_with_nan_marks_and_numpy_leaves_is_not_taken_for_random() -> None:
    """NaN equals NaN when a batch is read twice (masked labels), and NumPy leaves compare as arrays."""
    import numpy as np

    model = nn.Linear(3, 2).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    y[0, 1] = float("nan")

    def masked(z: torch.Tensor, t: dict) -> torch.Tensor:
        keep = ~t["y"].isnan()
        return (z[keep] - t["y"][keep]).pow(2).sum()

    class Loader:
        def __iter__(self):
            yield x[:3], {"y": y[:3], "ids": np.arange(3)}
            yield x[3:], {"y": y[3:], "ids": np.arange(3, 6)}

    curvature.HessianOperator(model, masked, Loader(), reduction="sum")


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
    model = case["model"]
    named = nn.Module()
    named.forward = lambda x: model(x)  # a model called with dict inputs, model(**{"x": ...})
    named.add_module("inner", model)
    with pytest.warns(UserWarning, match="two dicts of tensors"):
        curvature.HessianOperator(named, energy, [{"x": x[:12]}, {"x": x[12:]}])


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


def test_lazy_modules_are_named_and_the_monitor_waits_for_them() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="not initialized yet.*forward pass"):
        curvature.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    monitor = curvature.SharpnessMonitor(model, nn.CrossEntropyLoss(), (x, y))
    model(x)  # the first training forward pass initializes it
    assert monitor.step()["lambda_max"] > 0


def test_half_precision_model_that_cannot_run_in_float32() -> None:
    """The float32 certification of a half-precision result needs the model in float32; a model holding a plain
    half-precision tensor cannot: the result keeps its half-precision bounds, with a warning, instead of failing
    after all its products."""

    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.proj = torch.randn(4, 4)  # a plain attribute, not a buffer: not cast by the float32 view

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(x @ self.proj))

    model = Projected().to(torch.bfloat16)
    model.proj = model.proj.to(torch.bfloat16)
    data = (torch.randn(16, 4, dtype=torch.bfloat16), torch.randint(0, 3, (16,)))
    H = curvature.HessianOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.warns(RuntimeWarning, match="float32 products that certify"):
        result = curvature.eigenvalues(H, k=1, tol=0.5, generator=torch.Generator().manual_seed(0))
    assert result.values[0] > 0


def test_certification_products_are_counted_in_the_report() -> None:
    case = make_case("mlp_tanh_ce_mean", torch.bfloat16)
    report = curvature.sharpness(case["model"], case["loss_fn"], case["data"], metrics=("lambda_max",), tol=0.1,
                                 quiet=True, generator=torch.Generator().manual_seed(0))
    H = curvature.HessianOperator(case["model"], case["loss_fn"], case["data"])
    result = curvature.eigenvalues(H, k=1, tol=0.1, generator=torch.Generator().manual_seed(0))
    assert report.num_matvecs["eigenvalues"] == result.num_matvecs == H.num_matvecs
