"""Per-sample gradients and the structured exact diagonals against per-sample autograd and dense float64 references.

The references share no code with ``curvature.operators.per_sample``: each sample's gradient is ``torch.autograd``
of the sample's summed loss on a one-sample batch, each sample's GGN or Fisher diagonal the diagonal of
``curvature.reference`` on that one-sample batch (summed loss), and the whole-data diagonals those of the dense
references over the registry.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Callable, Iterator

import pytest
import torch
from cases import make_case
from helpers import assert_unchanged, build, operator_cases, reference, rel_err, snapshot
from torch import nn

import curvature
from curvature import reference as ref
from curvature.operators.data import Data, split_batch
from curvature.operators.per_sample import per_sample_diagonals

CASES = sorted({c for _, c in operator_cases()})


@functools.cache
def structured(kind: str, case_name: str) -> bool:
    return kind != "hessian" and bool(build(kind, case_name).has_exact_diagonal)


STRUCTURED = [(k, c) for k, c in operator_cases() if structured(k, c)]


def samples(data: Any) -> Iterator[tuple[Any, Any]]:
    """Every sample of the data as a one-sample batch, in order."""
    for inputs, targets in Data(data):
        n = curvature.operators.data.batch_size(inputs)
        for i in range(n):
            yield split_batch(inputs, i, i + 1, n)[1], split_batch(targets, i, i + 1, n)[1]


def summed(case: dict[str, Any]) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The case's loss of a batch with its mean undone: the sum over the batch's counted units."""
    loss_fn = case["loss_fn"]
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        total = copy.deepcopy(loss_fn)
        total.reduction = "sum"
        return total
    if isinstance(loss_fn, curvature.NormalizedLoss):
        return lambda z, y: loss_fn(z, y) * loss_fn._normalizer(z, y)
    return lambda z, y: loss_fn(z, y) * z.shape[0]  # a callable mean over samples (generic_loss_mean)


def call(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


@functools.cache
def per_sample_reference(case_name: str) -> torch.Tensor:
    """``(N, P)``: each sample's gradient of its summed loss, by autograd on the sample alone."""
    case = make_case(case_name)
    loss = summed(case)
    rows = []
    for x, y in samples(case["data"]):
        grads = torch.autograd.grad(loss(call(case["model"], x), y), trainable(case["model"]), allow_unused=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("case_name", CASES)
def test_per_sample_gradients(case_name: str) -> None:
    case = make_case(case_name)
    expected = per_sample_reference(case_name)
    stream = curvature.per_sample_gradients(case["model"], case["loss_fn"], case["data"], chunk_size=4)
    chunks = list(stream)
    got = torch.cat([c.values for c in chunks])
    assert torch.equal(torch.cat([c.indices for c in chunks]), torch.arange(expected.shape[0]))
    scale = float(expected.abs().max())
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * scale)
    # the exact weighting: the gradient of the whole-data loss is the sum over samples divided by the normalizer
    case = make_case(case_name)
    from helpers import full_data_closure

    full = torch.autograd.grad(full_data_closure(case)(), trainable(case["model"]), allow_unused=True)
    full = torch.cat([g.reshape(-1) for g in full])
    assert stream.normalizer is not None
    assert torch.allclose(expected.sum(0) / stream.normalizer, full, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("kind, case_name", STRUCTURED)
def test_structured_exact_diagonal(kind: str, case_name: str) -> None:
    dense = reference(kind, case_name).diagonal()
    op = build(kind, case_name)
    est = curvature.diagonal(op, method="exact")
    assert est.num_matvecs == 0  # from the structure, not from products
    assert torch.allclose(est.value, dense, rtol=0, atol=1e-10 * float(dense.abs().max()))
    # summed chunk by chunk (matrix products for one-row layers), whatever the chunks
    assert torch.allclose(op.diagonal(chunk_size=4), dense, rtol=0, atol=1e-10 * float(dense.abs().max()))


@pytest.mark.parametrize("kind, case_name", STRUCTURED)
def test_per_sample_diagonals(kind: str, case_name: str) -> None:
    """Each sample's diagonal is that of its own summed loss (GGN, Fisher) or its own loss (empirical Fisher)."""
    case = make_case(case_name)
    op = build(kind, case_name)
    stream = per_sample_diagonals(op, chunk_size=3)
    got = stream.stack()
    loss = case["loss_fn"] if kind == "empirical_fisher" else summed(case)
    extra = {"reduction": case.get("reduction", getattr(case["loss_fn"], "reduction", None))} \
        if kind == "empirical_fisher" else {}
    expected = torch.stack([ref.REFERENCES[kind](case["model"], loss, (x, y), **extra).diagonal()
                            for x, y in samples(case["data"])])
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    assert torch.allclose(got.sum(0) / stream.normalizer, reference(kind, case_name).diagonal(), rtol=0,
                          atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("case_name", [c for k, c in STRUCTURED if k == "fisher"])
def test_monte_carlo_diagonal_is_the_operators_own(case_name: str) -> None:
    """The Monte-Carlo Fisher's diagonal uses the operator's fixed draws: it is the diagonal of that very matrix."""
    case = make_case(case_name)
    op = curvature.FisherOperator(case["model"], case["loss_fn"], case["data"], mc_samples=3,
                                  generator=torch.Generator().manual_seed(0))
    dense = op.to_dense().diagonal()
    assert torch.allclose(op.diagonal(), dense, rtol=0, atol=1e-10 * float(dense.abs().max()))
    values = per_sample_diagonals(op).stack()
    assert values.shape == (sum(1 for _ in samples(case["data"])), op.shape[0]) and bool((values >= 0).all())


def _mc_error(samples_: int, seed: int) -> float:
    case = make_case("ce_nd_logits_sum")
    op = curvature.FisherOperator(case["model"], case["loss_fn"], case["data"], mc_samples=samples_,
                                  generator=torch.Generator().manual_seed(seed))
    return rel_err(op.to_dense(), reference("fisher", "ce_nd_logits_sum"))


def test_monte_carlo_fisher_samples_per_position() -> None:
    """On (N, C, T) logits the draws are per position, so the error has no cross-position term: with one draw per
    position the Monte-Carlo Fisher is block diagonal over positions for every sample, like the exact one."""
    case = make_case("ce_nd_logits_sum")
    model, loss_fn, data = case["model"], case["loss_fn"], case["data"]
    x, y = next(iter(Data(data)))
    op = curvature.FisherOperator(model, loss_fn, (x[:1], y[:1]), mc_samples=1,
                                  generator=torch.Generator().manual_seed(0))
    F = op.to_dense()
    # one draw per position: F = sum_t J_t^T g_t g_t^T J_t has rank T (one joint draw would give rank 1)
    positions = math.prod(model(x[:1]).shape[2:])
    assert positions > 1 and int(torch.linalg.matrix_rank(F, rtol=1e-10)) == min(positions, F.shape[0])
    # and it is less noisy: relative Frobenius error 0.0039-0.0042 at 4000 draws (seeds 0-2) against 0.0103-0.0120
    # with one joint draw per sample, measured on this case; both converge to the exact Fisher
    assert max(_mc_error(4000, seed) for seed in range(2)) < 0.007


def _without_rows(stream: curvature.PerSample) -> curvature.PerSample:
    """The stream with every parameter pulled back by vmap (no layer's rows)."""
    stream._row_layers().layers = []
    return stream


@pytest.mark.parametrize("case_name", CASES)
def test_rows_and_vmap_paths_agree(case_name: str) -> None:
    """The layers' recorded rows (Linear, convolutions, norms) and vmap over the samples give the same rows."""
    case = make_case(case_name)
    args = (case["model"], case["loss_fn"], case["data"])
    rows = curvature.per_sample_gradients(*args, chunk_size=5).stack()
    vmapped = _without_rows(curvature.per_sample_gradients(*args, chunk_size=5)).stack()
    assert torch.allclose(rows, vmapped, rtol=0, atol=1e-12 * float(vmapped.abs().max()))
    # the norms without the rows (||g a^T|| = ||g|| ||a|| for one row), by either path
    expected = per_sample_reference(case_name).norm(dim=1)
    for stream in (curvature.per_sample_gradients(*args, chunk_size=5),
                   _without_rows(curvature.per_sample_gradients(*args, chunk_size=5))):
        assert torch.allclose(stream.norms(), expected, rtol=1e-10, atol=1e-12 * float(expected.max()))
    G = curvature.GGNOperator(*args) if structured("ggn", case_name) else curvature.EmpiricalFisherOperator(*args)
    rows = per_sample_diagonals(G, chunk_size=5).stack()
    vmapped = _without_rows(per_sample_diagonals(G, chunk_size=5)).stack()
    assert torch.allclose(rows, vmapped, rtol=0, atol=1e-12 * float(vmapped.abs().max()))


def test_chunks_and_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case("layernorm_ce_mean")
    stream = curvature.per_sample_gradients(case["model"], case["loss_fn"], case["data"], chunk_size=1)
    one = stream.stack()
    assert torch.allclose(curvature.per_sample_gradients(case["model"], case["loss_fn"], case["data"]).stack(), one,
                          rtol=1e-12, atol=1e-14)
    looped = _without_rows(curvature.per_sample_gradients(case["model"], case["loss_fn"], case["data"], chunk_size=5))
    looped._vmap_failed = True  # the sample-by-sample path vmap falls back to
    assert torch.allclose(looped.stack(), one, rtol=1e-12, atol=1e-14)
    # params= selects columns: the same rows restricted to the chosen parameters
    names = [n for n, p in case["model"].named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in case["model"].parameters() if p.requires_grad]
    chosen = [names[0], names[-1]]
    part = curvature.per_sample_gradients(case["model"], case["loss_fn"], case["data"], chosen).stack()
    columns = torch.split(one, sizes, dim=1)
    assert torch.allclose(part, torch.cat([columns[0], columns[-1]], dim=1), rtol=1e-12, atol=1e-14)


def test_model_with_data_dependent_control_flow_falls_back_to_the_loop() -> None:
    """A forward pass that writes into a fresh tensor in place cannot be vmapped: the loop computes the same rows."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.gain = nn.Parameter(torch.tensor([1.5, -0.5]))  # no layer owns it: pulled back by vmap, or the loop

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 2, dtype=x.dtype)
            out.copy_(self.lin(x) * self.gain)  # under vmap: an in-place write of a batched value into a fresh tensor
            return out

    torch.manual_seed(0)
    model = Gated().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    stream = curvature.per_sample_gradients(model, nn.CrossEntropyLoss(reduction="sum"), (x, y))
    got = stream.stack()
    assert stream._vmap_failed
    for n in range(6):
        expected = torch.autograd.grad(nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum"),
                                       list(model.parameters()))
        assert torch.allclose(got[n], torch.cat([g.reshape(-1) for g in expected]), rtol=1e-12, atol=1e-14)


def test_a_weight_also_used_outside_its_layer_is_pulled_back_whole() -> None:
    """Rows see only the layer's own use; the first chunk's gradient check hands such a parameter to vmap."""

    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.lin(x))
            return self.head(h + nn.functional.linear(h, self.lin.weight))  # lin.weight used a second time

    torch.manual_seed(0)
    model = Reused().double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    stream = curvature.per_sample_gradients(model, nn.CrossEntropyLoss(reduction="sum"), (x, y), chunk_size=3)
    got = stream.stack()
    assert "lin" not in [layer.name for layer in stream._row_layers().layers]
    for n in range(7):
        expected = torch.autograd.grad(nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum"),
                                       list(model.parameters()))
        assert torch.allclose(got[n], torch.cat([g.reshape(-1) for g in expected]), rtol=1e-12, atol=1e-14)


def test_norms_map_mean_and_gradient_norms() -> None:
    case = make_case("mlp_tanh_ce_mean")
    rows = per_sample_reference("mlp_tanh_ce_mean")
    norms = curvature.gradient_norms(case["model"], case["loss_fn"], case["data"], chunk_size=5)
    assert torch.allclose(norms, rows.norm(dim=1), rtol=1e-12)
    stream = curvature.per_sample_gradients(case["model"], case["loss_fn"], case["data"])
    assert torch.allclose(stream.map(lambda g: g[:, :3]), rows[:, :3], rtol=1e-12)
    assert torch.allclose(stream.mean(), rows.sum(0) / rows.shape[0], rtol=1e-12, atol=1e-15)
    assert stream.num_samples == rows.shape[0]


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
def test_nothing_lost(kind: str) -> None:
    case = make_case("batchnorm_eval_mse_mean")
    model = case["model"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    curvature.per_sample_gradients(model, case["loss_fn"], case["data"]).stack()
    op = curvature.operators.OPERATORS[kind](model, case["loss_fn"], case["data"])
    op.diagonal()
    assert_unchanged(model, before)


def test_float32_matches_float64() -> None:
    case32 = make_case("cnn_ce_mean", torch.float32)
    got = curvature.GGNOperator(case32["model"], case32["loss_fn"], case32["data"]).diagonal()
    assert got.dtype == torch.float32
    exact = reference("ggn", "cnn_ce_mean").diagonal()
    assert float((got.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    grads = curvature.per_sample_gradients(case32["model"], case32["loss_fn"], case32["data"]).stack()
    expected = per_sample_reference("cnn_ce_mean")
    assert float((grads.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_callable_loss_diagonal_uses_products() -> None:
    """Without a closed-form output Hessian there is no structure: diagonal() says so, the estimator takes P
    products."""
    case = make_case("generic_loss_mean")
    op = curvature.GGNOperator(case["model"], case["loss_fn"], case["data"])
    assert not op.has_exact_diagonal
    with pytest.raises(TypeError, match="method='exact'"):
        op.diagonal()
    with pytest.raises(TypeError, match="closed-form"):
        per_sample_diagonals(op)
    est = curvature.diagonal(op, method="exact")
    assert est.num_matvecs == op.shape[0]
    assert torch.allclose(est.value, reference("ggn", "generic_loss_mean").diagonal(), rtol=1e-10, atol=1e-14)


def test_bad_arguments() -> None:
    case = make_case("mlp_tanh_ce_mean")
    args = (case["model"], case["loss_fn"], case["data"])
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="chunk_size"):
            curvature.per_sample_gradients(*args, chunk_size=bad)
    with pytest.raises(TypeError, match="GGNOperator"):
        per_sample_diagonals(curvature.HessianOperator(*args))

    def coupled(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # normalized by the batch's spread
        return ((outputs - targets) ** 2).sum() / outputs.detach().std()

    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError):
        curvature.per_sample_gradients(model, coupled, [(x[:4], y[:4]), (x[4:], y[4:])], reduction="sum").stack()


def test_a_model_that_couples_the_samples_is_refused() -> None:
    """Per-sample gradients do not exist where a sample's outputs depend on the others: refused, never computed."""

    class Centered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return h - h.mean(0)  # every sample's output depends on the whole batch

    model = Centered().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    before = snapshot(model)
    with pytest.raises(ValueError, match="couples the samples"):
        curvature.per_sample_gradients(model, nn.CrossEntropyLoss(), (x, y)).stack()
    with pytest.raises(ValueError, match="couples the samples"):
        curvature.GGNOperator(model, nn.CrossEntropyLoss(), (x, y)).diagonal()
    assert_unchanged(model, before)
    # batches of one sample are each sample alone: defined, and computed
    singles = [(x[i:i + 1], y[i:i + 1]) for i in range(6)]
    assert curvature.per_sample_gradients(model, nn.CrossEntropyLoss(), singles).stack().shape == (6, 8)


def test_transformer_sequences() -> None:
    """The tiny GPT (attention, LayerNorm, tied embeddings, (N, V, T) logits): per-sample gradients and the GGN
    diagonal, one pullback per class and position."""
    import test_transformer as tt

    model, loss_fn, data = tt.make(True)
    got = curvature.GGNOperator(model, loss_fn, data).diagonal()
    dense = tt.dense("ggn", True).diagonal()
    assert torch.allclose(got, dense, rtol=0, atol=1e-10 * float(dense.abs().max()))
    x, y = data
    total = copy.deepcopy(loss_fn)
    total.reduction = "sum"
    rows = curvature.per_sample_gradients(model, loss_fn, data, chunk_size=2).stack()
    for n in range(x.shape[0]):
        g = torch.autograd.grad(total(model(x[n:n + 1]), y[n:n + 1]), list(model.parameters()))
        expected = torch.cat([t.reshape(-1) for t in g])
        assert torch.allclose(rows[n], expected, rtol=0, atol=1e-10 * float(rows.abs().max()))
