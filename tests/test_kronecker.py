"""K-FAC and EK-FAC over the case registry: exact where theory says so, never farther than K-FAC, cheap inverses.

The exact operators' dense references (``curvature.reference``) are the ground truth: K-FAC with one data point and
no weight sharing is the block diagonal of the GGN (Martens & Grosse 2015), deep linear networks with MSE make
expand and reduce exact in their settings (Eschenhagen et al. 2023), and EK-FAC is the Frobenius-closest operator
in K-FAC's eigenbasis (George et al. 2018).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from cases import FACTORIES, make_case
from helpers import assert_unchanged, rel_err, snapshot
from torch import nn

import curvature
from curvature import EKFACOperator, KFACOperator
from curvature.operators.data import Data
from curvature.reference import _cat

KRONECKER = {"kfac": KFACOperator, "ekfac": EKFACOperator}
EXACT = {"ggn": curvature.reference.ggn, "empirical": curvature.reference.empirical_fisher}


def _fisher_types(case: dict) -> list[str]:
    """The fisher types a case supports: the GGN for closed-form losses, the Monte-Carlo Fisher for likelihoods."""
    loss = case["loss_fn"]
    closed = isinstance(loss, (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss))
    return [t for t, ok in (("ggn", closed), ("mc", closed and case["likelihood"]), ("empirical", True)) if ok]


SUPPORTED = [name for name in FACTORIES if name != "tied_dict_inputs_ce_sum"]  # tied weights: refused (tested)
CASES = [(name, t) for name in SUPPORTED for t in _fisher_types(make_case(name))]
DETERMINISTIC = [(name, t) for name, t in CASES if t != "mc"]


def _build(cls: type, case: dict, **kw) -> KFACOperator:
    extra = {"reduction": case["reduction"]} if "reduction" in case else {}
    return cls(case["model"], case["loss_fn"], case["data"], **extra, **kw)


def _one_batch(case: dict, samples: slice | None = None) -> tuple:
    batches = list(Data(case["data"]))
    inputs, targets = _cat([b[0] for b in batches]), _cat([b[1] for b in batches])
    if samples is not None:
        inputs = inputs[samples] if not isinstance(inputs, dict) else {k: v[samples] for k, v in inputs.items()}
        targets = targets[samples]
    return inputs, targets


def _block_diagonal(dense: torch.Tensor, op: KFACOperator) -> torch.Tensor:
    offsets = [0]
    for size in op._sizes:
        offsets.append(offsets[-1] + size)
    out = torch.zeros_like(dense)
    for layer in op.layers:
        idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in layer.indices])
        out[idx[:, None], idx[None, :]] = dense[idx[:, None], idx[None, :]]
    return out


def _exact(case: dict, fisher_type: str, data: object) -> torch.Tensor:
    extra = {"reduction": case["reduction"]} if fisher_type == "empirical" and "reduction" in case else {}
    return EXACT[fisher_type](case["model"], case["loss_fn"], data, **extra)


def _shares_weights(op: KFACOperator, data: tuple) -> bool:
    """Whether any factored layer sees more than one row per sample (sequences, convolutions, repeated calls)."""
    rows = []
    with op._recorded():
        with torch.no_grad():
            curvature.operators.curvature.model_outputs(op.model, op._state(), data[0])
        for i, layer in enumerate(op.layers):
            a = torch.cat([layer.input_rows(x) for x, _ in op._recording[i]], dim=1)
            rows.append(a.shape[1])
    return max(rows) > 1


# -- where K-FAC is exact --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_name,fisher_type", DETERMINISTIC)
def test_one_data_point_is_the_block_diagonal(case_name: str, fisher_type: str) -> None:
    """One data point without weight sharing: K-FAC equals the block diagonal of its exact curvature to 1e-10."""
    case = make_case(case_name)
    point = _one_batch(case, slice(0, 1))
    if case_name == "lm_shifted_tokens_mean" or case_name == "ce_nd_ignore_index_mean":
        point = _one_batch(case, slice(1, 2))  # a sample with counted targets
    op = _build(KFACOperator, {**case, "data": point}, fisher_type=fisher_type)
    if _shares_weights(op, point):
        pytest.skip("weight sharing: K-FAC is an approximation here (tested against EK-FAC and the batching below)")
    exact = _block_diagonal(_exact(case, fisher_type, point), op)
    assert rel_err(op.to_dense(), exact) < 1e-10


def _deep_linear(sequence: bool, reduce: bool) -> nn.Module:
    class DeepLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.head = nn.Linear(4, 5), nn.Linear(5, 5, bias=False), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.second(self.first(x))
            return self.head(h.mean(1) if reduce else h)

    return DeepLinear().double()


@pytest.mark.parametrize("setting", ["plain", "expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_mse_is_exact(setting: str, reduction: str) -> None:
    """Deep linear networks with MSE (Eschenhagen et al. 2023): exact for any data, in the matching setting."""
    torch.manual_seed(0)
    model = _deep_linear(setting != "plain", setting == "reduce")
    x = torch.randn(9, 4, dtype=torch.float64) if setting == "plain" else torch.randn(9, 6, 4, dtype=torch.float64)
    y = torch.randn(9, 3, dtype=torch.float64) if setting != "expand" else torch.randn(9, 6, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    approx = "reduce" if setting == "reduce" else "expand"
    op = KFACOperator(model, loss_fn, batches, kfac_approx=approx)
    exact = _block_diagonal(curvature.reference.ggn(model, loss_fn, batches), op)
    assert rel_err(op.to_dense(), exact) < 1e-10
    if setting != "plain":  # and the other approximation is not exact there: the test can tell them apart
        other = KFACOperator(model, loss_fn, batches, kfac_approx="expand" if approx == "reduce" else "reduce")
        assert rel_err(other.to_dense(), exact) > 1e-3


def _joint_draws(sampled: curvature.FisherOperator, data: Any) -> torch.Tensor:
    """The Monte-Carlo Fisher of ``sampled``'s draws with each draw backpropagated whole (K-FAC's one column per
    draw): :math:`\frac1W \\sum_b w_b c_b \\sum_m J_b^\top g_{bm} g_{bm}^\top J_b`. FisherOperator applies the same
    draws unit by unit (no cross-unit terms); on ``(N, C)`` logits the two are the same matrix."""
    params = [p for p in sampled.model.parameters() if p.requires_grad]
    total, weights = 0.0, 0.0
    for index, (inputs, targets) in enumerate(Data(data)):
        z = sampled.model(**inputs) if isinstance(inputs, dict) else sampled.model(inputs)
        if z.shape[0] == 0:
            continue
        g, scale = sampled._draws(z.detach(), targets, index)
        weight = sampled._weight(targets, inputs, z.detach())
        pulled = [torch.autograd.grad(z[n], params, gm[n], retain_graph=True)  # each draw whole within a sample
                  for gm in g for n in range(z.shape[0])]
        rows = torch.stack([torch.cat([t.reshape(-1) for t in grads]) for grads in pulled])
        total = total + weight * scale * rows.T @ rows
        weights += weight
    return total / weights if sampled.reduction == "mean" else total


@pytest.mark.parametrize("case_name", [n for n, t in CASES if t == "mc"])
def test_monte_carlo_matches_the_sampled_fisher_and_converges(case_name: str) -> None:
    """One data point: K-FAC "mc" is the block diagonal of FisherOperator with the same draws; more draws converge."""
    case = make_case(case_name)
    point = _one_batch(case, slice(0, 1))
    op = _build(KFACOperator, {**case, "data": point}, fisher_type="mc", mc_samples=3,
                generator=torch.Generator().manual_seed(5))
    if _shares_weights(op, point):
        pytest.skip("weight sharing")
    sampled = curvature.FisherOperator(case["model"], case["loss_fn"], point, mc_samples=3,
                                       generator=torch.Generator().manual_seed(5))
    assert rel_err(op.to_dense(), _block_diagonal(_joint_draws(sampled, point), op)) < 1e-10
    exact = KFACOperator(case["model"], case["loss_fn"], case["data"]).to_dense()
    errors = [rel_err(KFACOperator(case["model"], case["loss_fn"], case["data"], fisher_type="mc", mc_samples=m,
                                   generator=torch.Generator().manual_seed(1)).to_dense(), exact) for m in (1, 400)]
    assert errors[1] < 0.35 * errors[0]


# -- everywhere: batching, EK-FAC, the structure's exact quantities ----------------------------------------------------
@pytest.mark.parametrize("case_name,fisher_type", DETERMINISTIC)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_batching_does_not_change_the_factors(case_name: str, fisher_type: str, approx: str) -> None:
    """The factors of uneven batches and loaders equal those of all data in one batch (float64, 1e-10)."""
    case = make_case(case_name)
    whole = _one_batch(case)
    batched = _build(KFACOperator, case, fisher_type=fisher_type, kfac_approx=approx)
    together = _build(KFACOperator, {**case, "data": whole}, fisher_type=fisher_type, kfac_approx=approx)
    assert rel_err(batched.to_dense(), together.to_dense()) < 1e-10


@pytest.mark.parametrize("case_name,fisher_type", CASES)
def test_ekfac_is_never_farther_than_kfac(case_name: str, fisher_type: str) -> None:
    """EK-FAC's Frobenius distance to the block-diagonal curvature is at most K-FAC's, on every case."""
    case = make_case(case_name)
    kw = dict(fisher_type=fisher_type, generator=torch.Generator().manual_seed(0))
    kfac = _build(KFACOperator, case, **kw)
    ekfac = _build(EKFACOperator, case, **{**kw, "generator": torch.Generator().manual_seed(0)})
    if fisher_type == "mc":
        target = _joint_draws(curvature.FisherOperator(case["model"], case["loss_fn"], case["data"], mc_samples=1,
                                                       generator=torch.Generator().manual_seed(0)), case["data"])
    else:
        target = _exact(case, fisher_type, case["data"])
    target = _block_diagonal(target, kfac)
    d_kfac, d_ekfac = (float((op.to_dense() - target).norm()) for op in (kfac, ekfac))
    assert d_ekfac <= d_kfac * (1 + 1e-10)


@pytest.mark.parametrize("kind", sorted(KRONECKER))
@pytest.mark.parametrize("case_name,fisher_type", DETERMINISTIC[::2])
def test_inverse_logdet_trace_norm_eigh(kind: str, case_name: str, fisher_type: str) -> None:
    """``inverse``, ``logdet``, ``trace``, ``frobenius_norm`` and ``eigh`` agree with the dense matrix (1e-10)."""
    case = make_case(case_name)
    op = _build(KRONECKER[kind], case, fisher_type=fisher_type)
    dense = op.to_dense()
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    damping = 0.1 * float(dense.diagonal().mean())
    V = torch.randn(dense.shape[0], 3, dtype=dense.dtype)
    assert rel_err(op.inverse(damping) @ V, torch.linalg.solve(dense + damping * eye, V)) < 1e-10
    assert abs(float(op.logdet(damping)) - float(torch.logdet(dense + damping * eye))) < 1e-9 * dense.shape[0]
    assert abs(float(op.trace()) - float(dense.trace())) < 1e-10 * float(dense.trace())
    assert abs(float(op.frobenius_norm()) - float(dense.norm())) < 1e-10 * float(dense.norm())
    values = torch.cat([e.eigenvalues.reshape(-1) for e in op.eigh()]).sort().values
    assert rel_err(values, torch.linalg.eigvalsh(dense).clamp_min(0)) < 1e-9
    assert op.is_psd and op.is_symmetric


@pytest.mark.parametrize("case_name", ["mlp_tanh_ce_mean", "cnn_ce_mean", "layernorm_ce_mean"])
def test_heuristic_damping_is_the_pi_corrected_kronecker_inverse(case_name: str) -> None:
    """The heuristic inverse is (G + √δ/π)^-1 ⊗ (A + π√δ)^-1 per block, with π² = (tr A / dA) / (tr G / dG)."""
    case = make_case(case_name)
    op = KFACOperator(case["model"], case["loss_fn"], case["data"])
    damping = 0.05
    inverse = op.inverse(damping, heuristic_damping=True).to_dense()
    expected = torch.zeros_like(inverse)
    offsets = [0]
    for size in op._sizes:
        offsets.append(offsets[-1] + size)
    for layer, block in zip(op.layers, op._blocks):
        G, A = block.row[0], block.col[0]
        if layer.kind == "norm":
            part = torch.linalg.inv(A + damping * torch.eye(len(A), dtype=A.dtype))
        else:
            pi = ((A.trace() / len(A)) / (G.trace() / len(G))).sqrt()
            eye_g, eye_a = torch.eye(len(G), dtype=G.dtype), torch.eye(len(A), dtype=A.dtype)
            part = torch.kron(torch.linalg.inv(G + damping**0.5 / pi * eye_g),
                              torch.linalg.inv(A + damping**0.5 * pi * eye_a))
            if layer.bias is not None and layer.weight is not None:  # [W | b] columns to the (W, b) flat order
                d_out, d_in = len(G), len(A) - 1
                order = [o * (d_in + 1) + i for o in range(d_out) for i in range(d_in)]
                order += [o * (d_in + 1) + d_in for o in range(d_out)]
                part = part[order][:, order]
        idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in layer.indices])
        expected[idx[:, None], idx[None, :]] = part
    assert rel_err(inverse, expected) < 1e-10


def test_float32_matches_float64() -> None:
    """Float32 factors agree with float64 ones to 1e-5 relative."""
    ops = [KFACOperator(c["model"], c["loss_fn"], c["data"]) for c in
           (make_case("cnn_ce_mean", dt) for dt in (torch.float32, torch.float64))]
    assert ops[0].dtype == torch.float32
    assert rel_err(ops[0].to_dense(), ops[1].to_dense()) < 1e-5


# -- conventions: nothing lost, state, following the model ------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KRONECKER))
def test_nothing_lost(kind: str) -> None:
    """Parameters, .grad, buffers, modes, hooks and the RNG are unchanged, also after an interrupt."""
    case = make_case("batchnorm_eval_mse_mean")
    model = case["model"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    before = snapshot(model)
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    op = KRONECKER[kind](model, case["loss_fn"], case["data"], fisher_type="mc")
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op @ v
    op.inverse(0.1) @ v
    assert_unchanged(model, before)
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    model[2].register_forward_hook(interrupt)
    hooks = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    with pytest.raises(KeyboardInterrupt):
        KRONECKER[kind](model, case["loss_fn"], case["data"]).compute()
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == hooks
    assert_unchanged(model, before)


def test_factors_follow_the_parameters_and_round_trip() -> None:
    """Products after a parameter update use new factors; ``state_dict`` restores the old ones exactly."""
    case = make_case("mlp_tanh_ce_mean")
    op = KFACOperator(case["model"], case["loss_fn"], case["data"])
    before = op.to_dense()
    state = copy.deepcopy(op.state_dict())
    with torch.no_grad():
        case["model"][0].weight.mul_(1.5)
    after = op.to_dense()
    assert rel_err(after, before) > 1e-3
    fresh = KFACOperator(case["model"], case["loss_fn"], case["data"])
    assert rel_err(fresh.to_dense(), after) < 1e-12
    fresh.load_state_dict(state)
    assert rel_err(fresh.to_dense(), before) < 1e-12
    ekfac = EKFACOperator(case["model"], case["loss_fn"], case["data"])
    with pytest.raises(ValueError, match="K-FAC state"):
        ekfac.load_state_dict(state | {"fisher_type": "ggn"})
    with pytest.raises(ValueError, match="kfac_approx"):
        KFACOperator(case["model"], case["loss_fn"], case["data"], kfac_approx="reduce").load_state_dict(state)


# -- layers -----------------------------------------------------------------------------------------------------------
CONVOLUTIONS = {
    "padding_stride": lambda: nn.Conv2d(2, 4, 3, padding=1, stride=2),
    "dilation": lambda: nn.Conv2d(2, 4, 3, dilation=2, padding=2),
    "groups": lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
    "same": lambda: nn.Conv2d(2, 3, 4, padding="same"),
    "reflect": lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    "circular_1d": lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular", bias=False),
    "no_sharing": lambda: nn.Conv2d(2, 3, 5),
}


@pytest.mark.parametrize("conv", sorted(CONVOLUTIONS))
def test_convolutions(conv: str) -> None:
    """Every convolution variant is factored (its rows rebuild autograd's gradient, checked by the operator); with a
    1x1 output map there is no weight sharing and K-FAC is exact for one data point."""
    torch.manual_seed(0)
    layer = CONVOLUTIONS[conv]().double()
    channels = layer.in_channels
    x = torch.randn(5, channels, 5, dtype=torch.float64) if isinstance(layer, nn.Conv1d) else \
        torch.randn(5, channels, 5, 5, dtype=torch.float64)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    model(x)
    data = (x, torch.randint(0, 3, (5,)))
    kfac, ekfac = KFACOperator(model, nn.CrossEntropyLoss(), data), EKFACOperator(model, nn.CrossEntropyLoss(), data)
    target = _block_diagonal(curvature.reference.ggn(model, nn.CrossEntropyLoss(), data), kfac)
    assert float((ekfac.to_dense() - target).norm()) <= float((kfac.to_dense() - target).norm()) * (1 + 1e-10)
    if conv == "no_sharing":
        point = (x[:1], data[1][:1])
        one = KFACOperator(model, nn.CrossEntropyLoss(), point)
        exact = _block_diagonal(curvature.reference.ggn(model, nn.CrossEntropyLoss(), point), one)
        assert rel_err(one.to_dense(), exact) < 1e-10


def test_embedding_with_padding_and_group_norm() -> None:
    """Embedding rows with padding_idx (zero gradient, zero factor row) and GroupNorm's affine block."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(9, 4, padding_idx=0)
            self.norm = nn.GroupNorm(2, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.embed(tokens).transpose(1, 2))  # (N, C=4, T)
            return self.head(torch.tanh(h).mean(2))

    model = Model().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 9, (1, 1))
    tokens[0, 0] = 3
    data = (tokens, torch.tensor([1]))
    op = KFACOperator(model, nn.CrossEntropyLoss(), data)
    exact = _block_diagonal(curvature.reference.ggn(model, nn.CrossEntropyLoss(), data), op)
    assert rel_err(op.to_dense(), exact) < 1e-10  # one token: no sharing
    many = (torch.randint(0, 9, (6, 5)), torch.randint(0, 3, (6,)))
    op = KFACOperator(model, nn.CrossEntropyLoss(), many)
    dense = op.to_dense()
    assert torch.all(dense[:4, :] == 0)  # the padding row's four weights
    ekfac = EKFACOperator(model, nn.CrossEntropyLoss(), many)
    assert torch.all(ekfac.to_dense()[:4, :] == 0)  # EK-FAC's fit keeps the padding row at zero too
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel_err(ekfac.inverse(0.1) @ (ekfac @ v + 0.1 * v), v) < 1e-10


# -- errors -----------------------------------------------------------------------------------------------------------
def test_refusals() -> None:
    """Bad options and parameters K-FAC cannot factor are refused by name, before any work."""
    case = make_case("mlp_tanh_ce_mean")
    model, loss_fn, data = case["model"], case["loss_fn"], case["data"]
    with pytest.raises(ValueError, match="curvlinops' 'type-2' is 'ggn'"):
        KFACOperator(model, loss_fn, data, fisher_type="type-2")
    with pytest.raises(ValueError, match="kfac_approx"):
        KFACOperator(model, loss_fn, data, kfac_approx="full")
    with pytest.raises(ValueError, match="mc_samples"):
        KFACOperator(model, loss_fn, data, fisher_type="mc", mc_samples=0)
    with pytest.raises(TypeError, match="keeps no graphs"):
        KFACOperator(model, loss_fn, data, keep_graph=True)
    with pytest.raises(ValueError, match="damping must be non-negative"):
        KFACOperator(model, loss_fn, data).inverse(-1.0)
    with pytest.raises(ValueError, match="heuristic"):
        EKFACOperator(model, loss_fn, data).inverse(0.1, heuristic_damping=True)
    generic = make_case("generic_loss_mean")
    with pytest.raises(TypeError, match="fisher_type='empirical'"):
        KFACOperator(generic["model"], generic["loss_fn"], generic["data"], reduction="mean")
    tied = make_case("tied_dict_inputs_ce_sum")
    with pytest.raises(ValueError, match="used by modules 'first' and 'second'"):
        KFACOperator(tied["model"], tied["loss_fn"], tied["data"])

    class Scaled(nn.Module):  # a parameter outside any factored layer
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.scale = nn.Linear(5, 3), nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.scale

    with pytest.raises(ValueError, match=r"\['scale'\]"):
        KFACOperator(Scaled().double(), loss_fn, data)
    KFACOperator(Scaled().double(), loss_fn, data, params=["linear.weight", "linear.bias"]).compute()

    class TiedHead(nn.Module):  # the language-model tying: the embedding's weight reused functionally
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(6, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(torch.tanh(self.embed(tokens)).mean(1), self.embed.weight)

    tokens = (torch.randint(0, 6, (5, 3)), torch.randint(0, 6, (5,)))
    with pytest.raises(ValueError, match="used outside the module's forward"):
        KFACOperator(TiedHead().double(), nn.CrossEntropyLoss(), tokens).compute()

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['unused'\] were not called"):
        KFACOperator(Unused().double(), loss_fn, data, params=["used.weight", "unused.weight"]).compute()


@pytest.mark.parametrize("kind", sorted(KRONECKER))
@pytest.mark.parametrize("fisher_type", ["ggn", "empirical", "mc"])
def test_unsupported_parameters_get_their_exact_diagonal(kind: str, fisher_type: str) -> None:
    """``unsupported="diagonal"``: parameters no layer owns (a free scale, tied weights) get the exact diagonal of the
    same curvature, zero elsewhere; the factored blocks are unchanged."""
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)
            self.second.weight = self.first.weight  # tied: used by two factored modules
            self.head, self.scale = nn.Linear(4, 3), nn.Parameter(torch.linspace(0.5, 1.5, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.second(torch.tanh(self.first(x))))) * self.scale

    model = Scaled().double()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))),
            (torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,)))]
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(fisher_type=fisher_type, generator=torch.Generator().manual_seed(3), unsupported="diagonal")
    op = KRONECKER[kind](model, loss_fn, data, **kw)
    assert sorted(op.param_names[i] for i in op.diagonal.indices) == ["first.weight", "scale"]
    if fisher_type == "mc":
        exact = curvature.FisherOperator(model, loss_fn, data, mc_samples=1,
                                         generator=torch.Generator().manual_seed(3)).to_dense()
    else:
        exact = EXACT[fisher_type](model, loss_fn, data)
    dense = op.to_dense()
    offsets = [0]
    for size in op._sizes:
        offsets.append(offsets[-1] + size)
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in op.diagonal.indices])
    assert rel_err(dense[idx, idx], exact[idx, idx]) < 1e-10
    sub = dense[idx][:, idx]
    assert torch.equal(sub - torch.diag(sub.diagonal()), torch.zeros_like(sub))
    rest = torch.ones(dense.shape[0], dtype=torch.bool)
    rest[idx] = False
    assert torch.all(dense[idx][:, rest] == 0)
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel_err(op.inverse(0.1) @ (dense @ v + 0.1 * v), v) < 1e-10
    restored = KRONECKER[kind](model, loss_fn, data, **{**kw, "generator": torch.Generator().manual_seed(3)})
    restored.load_state_dict(op.state_dict())
    assert rel_err(restored.to_dense(), dense) < 1e-14
    with pytest.raises(ValueError, match="unsupported must be"):
        KFACOperator(model, loss_fn, data, unsupported="ignore")


@pytest.mark.parametrize("samples", [5, 4])  # 4: as many samples as positions, caught by running half the batch
def test_modules_applied_to_shared_inputs_are_refused(samples: int) -> None:
    """A position embedding called on ``arange(T)`` has no per-sample rows: refused by name, never mis-factored."""
    torch.manual_seed(0)

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.pos, self.head = nn.Embedding(7, 3), nn.Embedding(4, 3), nn.Linear(3, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.tokens(ids) + self.pos(torch.arange(ids.shape[1]))
            return self.head(torch.tanh(h)).mean(1)

    model = Positions().double()
    data = (torch.randint(0, 7, (samples, 4)), torch.randint(0, 2, (samples,)))
    with pytest.raises(ValueError, match="module 'pos' is called on a tensor whose leading dimension"):
        KFACOperator(model, nn.CrossEntropyLoss(), data).compute()
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, params=["tokens.weight", "head.weight", "head.bias"])
    assert op.trace() > 0


@pytest.mark.parametrize("case_name", ["mlp_tanh_ce_mean", "cnn_ce_mean", "layernorm_ce_mean", "embedding_ce_mean"])
@pytest.mark.parametrize("fisher_type", ["ggn", "mc"])
def test_ekfac_fit_from_kept_rows_equals_a_second_pass(case_name: str, fisher_type: str) -> None:
    """A single batch's fit reuses the factors' rows; the result equals the fit's own second pass."""
    case = make_case(case_name)
    kw = dict(fisher_type=fisher_type, generator=torch.Generator().manual_seed(0))
    kept = EKFACOperator(case["model"], case["loss_fn"], case["data"], **kw)
    second = EKFACOperator(case["model"], case["loss_fn"], case["data"],
                           **{**kw, "generator": torch.Generator().manual_seed(0)})
    second.keep_rows_limit = 0  # forces the second pass
    passes = {id(kept): 0, id(second): 0}
    for op in (kept, second):
        def counted(op: EKFACOperator = op, build: object = op._build_contexts) -> object:
            passes[id(op)] += 1
            return build()
        op._build_contexts = counted
    assert rel_err(kept.to_dense(), second.to_dense()) < 1e-12
    assert (passes[id(kept)], passes[id(second)]) == (1, 2)
