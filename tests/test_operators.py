"""Every operator against its dense float64 reference, over the whole case registry."""

from __future__ import annotations

import pytest
import scipy.sparse.linalg
import torch
from cases import make_case
from helpers import OPERATORS, assert_unchanged, operator_cases, reference, rel_err, snapshot

import curvature
import curvature.reference as curvature_reference
from curvature import GGNOperator, HessianOperator

PAIRS = pytest.mark.parametrize("kind, case_name", operator_cases())  # Fisher: likelihood losses only


def _build(kind: str, case: dict, **kwargs):
    return OPERATORS[kind][0](case["model"], case["loss_fn"], case["data"], **kwargs)


def _reference(kind: str, case: dict) -> torch.Tensor:
    return reference(kind, case["name"])


@PAIRS
def test_matches_dense_reference_float64(kind: str, case: dict) -> None:
    op = _build(kind, case)
    dense = op.to_dense()
    ref = _reference(kind, case)
    assert dense.dtype == torch.float64
    assert op.shape == ref.shape
    assert rel_err(dense, ref) <= 1e-10
    assert rel_err(dense, dense.T) <= 1e-12  # symmetric
    if op.is_psd:
        assert torch.linalg.eigvalsh(dense).min() >= -1e-10 * ref.norm()
    assert op.num_matvecs == op.shape[0]


@PAIRS
def test_matches_dense_reference_float32(kind: str, case_name: str) -> None:
    case32 = make_case(case_name, torch.float32)
    op = _build(kind, case32)
    assert op.dtype == torch.float32
    assert rel_err(op.to_dense(), reference(kind, case_name)) <= 1e-5


@PAIRS
def test_model_unchanged(kind: str, case: dict) -> None:
    model = case["model"]
    for p in model.parameters():  # a user's pending gradients must survive
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    op = _build(kind, case)
    v = torch.randn(op.shape[0], 3, dtype=op.dtype, generator=torch.Generator().manual_seed(0))
    op @ v
    op @ v[:, 0]
    assert_unchanged(model, before)


@PAIRS
@pytest.mark.parametrize("keep_graph", [True, False])
@pytest.mark.parametrize("vectorize", [True, False])
def test_strategies_agree(kind: str, keep_graph: bool, vectorize: bool, case: dict) -> None:
    default = _build(kind, case)
    op = _build(kind, case, keep_graph=keep_graph, vectorize=vectorize)
    V = torch.randn(op.shape[0], 4, dtype=op.dtype, generator=torch.Generator().manual_seed(1))
    expected = default @ V
    for _ in range(2):  # the second product reuses kept graphs
        assert rel_err(op @ V, expected) <= 1e-12
    columns = torch.stack([op @ V[:, j] for j in range(4)], dim=1)
    assert rel_err(columns, expected) <= 1e-12


@PAIRS
@pytest.mark.parametrize("keep_graph", [True, False])
def test_gradient_matches_dense_reference_and_spends_no_product(kind: str, keep_graph: bool, case: dict) -> None:
    """The loss gradient over the data, weighted like the loss (not like the empirical Fisher's products), in
    float64 to 1e-10, read from the Hessian's kept graphs or computed by a pass; no product counted, model kept."""
    model = case["model"]
    expected = curvature_reference.gradient(model, case["loss_fn"], case["data"])  # (a DataLoader draws its seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    op = _build(kind, case, keep_graph=keep_graph)
    assert rel_err(op.gradient(), expected) <= 1e-10
    op @ torch.ones(op.shape[0], dtype=op.dtype)  # builds the kept graphs: the gradient is then read from them
    assert rel_err(op.gradient(), expected) <= 1e-10
    assert op.num_matvecs == 1
    assert_unchanged(model, before)


def test_loader_equals_full_batch() -> None:
    """Batch size 7 over 100 samples gives the operator of one full batch (the uneven batch weighted right)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(100, 4, dtype=torch.float64), torch.randint(0, 3, (100,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 5, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        loss_fn = torch.nn.CrossEntropyLoss(reduction=reduction)
        for cls, _ in OPERATORS.values():
            full = cls(model, loss_fn, (x, y)) @ V
            assert rel_err(cls(model, loss_fn, loader) @ V, full) <= 1e-12


def test_params_restriction_by_name_and_tensor(case: dict) -> None:
    """A restricted operator is the principal block of the full one over the chosen parameters."""
    model = case["model"]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    offsets = torch.cumsum(torch.tensor([0] + [p.numel() for _, p in trainable]), 0).tolist()
    chosen = list(range(0, len(trainable), 2))
    index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in chosen])
    block = reference("hessian", case["name"])[index][:, index]
    names = [trainable[i][0] for i in chosen]
    by_name = HessianOperator(model, case["loss_fn"], case["data"], params=names)
    by_tensor = HessianOperator(model, case["loss_fn"], case["data"], params=[trainable[i][1] for i in chosen[::-1]])
    assert by_name.param_names == by_tensor.param_names == names
    assert by_name.shape == block.shape
    V = torch.randn(block.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel_err(by_name @ V, block @ V) <= 1e-10
    assert rel_err(by_tensor @ V, block @ V) <= 1e-10


def test_kept_graph_follows_parameter_updates() -> None:
    case = make_case("mlp_tanh_ce_mean")
    model = case["model"]
    H = HessianOperator(model, case["loss_fn"], case["data"])
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fresh = HessianOperator(model, case["loss_fn"], case["data"], keep_graph=False)
    assert rel_err(H @ v, fresh @ v) <= 1e-12


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_scipy_eigsh_top_eigenvalue(kind: str) -> None:
    case = make_case("cnn_ce_mean")
    op = _build(kind, case)
    top = scipy.sparse.linalg.eigsh(op.to_scipy(), k=1, which="LA", return_eigenvectors=False)[0]
    assert top == pytest.approx(float(torch.linalg.eigvalsh(_reference(kind, case))[-1]), rel=1e-9)


def test_mc_fisher_converges_to_exact() -> None:
    case = make_case("mlp_tanh_ce_mean")
    exact = _reference("fisher", case)
    errors = {}
    for samples in (10, 1000):
        op = _build("fisher", case, mc_samples=samples, generator=torch.Generator().manual_seed(3))
        dense = op.to_dense()
        assert rel_err(dense, dense.T) <= 1e-12
        assert torch.linalg.eigvalsh(dense).min() >= -1e-10
        errors[samples] = rel_err(dense, exact)
    # Monte-Carlo error shrinks like 1/sqrt(samples): a factor 10 here; ask for 4.
    assert errors[1000] < errors[10] / 4
    assert errors[1000] < 0.05


@pytest.mark.parametrize("case_id", ["mlp_relu_mse_sum", "ce_nd_ignore_index_mean", "loader_uneven_mse_mean"])
def test_mc_fisher_is_unbiased(case_id: str) -> None:
    """The average over many independent MC operators approaches the exact Fisher."""
    case = make_case(case_id)
    exact = _reference("fisher", case)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(exact.shape[0], 3, dtype=torch.float64, generator=gen)
    mean = sum(_build("fisher", case, mc_samples=20, generator=gen) @ V for _ in range(20)) / 20
    assert rel_err(mean, exact @ V) < 0.05


def test_mc_fisher_is_reproducible_and_linear() -> None:
    case = make_case("loader_uneven_ce_mean")
    a = _build("fisher", case, mc_samples=3, generator=torch.Generator().manual_seed(5))
    b = _build("fisher", case, mc_samples=3, generator=torch.Generator().manual_seed(5))
    V = torch.randn(a.shape[0], 2, dtype=torch.float64)
    assert torch.equal(a @ V, b @ V)
    assert rel_err(a @ (V[:, 0] + V[:, 1]), (a @ V).sum(1)) <= 1e-12


def test_kept_graph_follows_writes_through_data() -> None:
    """EMA-style code writes through p.data, which bypasses version counters."""
    case = make_case("mlp_tanh_ce_mean")
    model = case["model"]
    G = GGNOperator(model, case["loss_fn"], case["data"])
    v = torch.randn(G.shape[0], dtype=torch.float64)
    G @ v
    for p in model.parameters():
        p.data.mul_(0.9)
    fresh = GGNOperator(model, case["loss_fn"], case["data"], keep_graph=False)
    assert rel_err(G @ v, fresh @ v) <= 1e-12


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_batch_with_every_target_ignored(kind: str) -> None:
    """Such a batch adds nothing to a mean loss; the operator equals the one without it."""
    case = make_case("mlp_tanh_ce_mean")
    (x, y), loss_fn = case["data"], case["loss_fn"]
    ignored = torch.full_like(y[:5], -100)
    with_empty = OPERATORS[kind][0](case["model"], loss_fn, [(x[5:], y[5:]), (x[:5], ignored)])
    without = OPERATORS[kind][0](case["model"], loss_fn, [(x[5:], y[5:])])
    # The empirical Fisher averages over samples: the 5 fully ignored ones have zero loss but count.
    scale = 19 / 24 if kind == "empirical_fisher" else 1.0
    V = torch.randn(without.shape[0], 2, dtype=torch.float64)
    assert rel_err(with_empty @ V, scale * (without @ V)) <= 1e-12


@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher"])
def test_fresh_forward_mode_falls_back(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model without forward-mode derivatives still gets fresh products (through the kept-graph path)."""
    case = make_case("loader_uneven_ce_mean")
    op = _build(kind, case)
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = op @ v  # forward mode

    def unsupported(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with an op that does not support it")

    monkeypatch.setattr(torch.autograd.forward_ad, "make_dual", unsupported)
    assert rel_err(op @ v, expected) <= 1e-12
    assert rel_err(op @ v, reference(kind, case["name"]) @ v) <= 1e-10


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_empty_batch_adds_nothing(kind: str) -> None:
    case = make_case("mlp_tanh_ce_mean")
    (x, y), model = case["data"], case["model"]
    def kwargs() -> dict:  # the MC Fisher, with the same seed for both operators
        return {"mc_samples": 2, "generator": torch.Generator().manual_seed(0)} if kind == "fisher" else {}

    for loss_fn in (case["loss_fn"], torch.nn.MSELoss()):
        targets = y if isinstance(loss_fn, torch.nn.CrossEntropyLoss) else torch.randn(24, 3, dtype=torch.float64)
        cls = OPERATORS[kind][0]
        with_empty = cls(model, loss_fn, [(x, targets), (x[:0], targets[:0])], **kwargs())
        without = cls(model, loss_fn, [(x, targets)], **kwargs())
        V = torch.randn(without.shape[0], 2, dtype=torch.float64)
        assert rel_err(with_empty @ V, without @ V) <= 1e-12


@pytest.mark.parametrize(
    "loss_fn",
    [torch.nn.NLLLoss(ignore_index=1), torch.nn.NLLLoss(weight=torch.tensor([0.5, 1.0, 2.0])),
     torch.nn.KLDivLoss(reduction="batchmean")],
    ids=["nll_ignore_index", "nll_weighted", "kl_batchmean"],
)
def test_other_averaging_losses_weight_batches_exactly(loss_fn: torch.nn.Module) -> None:
    """Losses outside MSE/CE that average over a varying count: batches still combine exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LogSoftmax(dim=1)).double()
    loss_fn = loss_fn.double()
    x = torch.randn(15, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (15,)) if isinstance(loss_fn, torch.nn.NLLLoss) \
        else torch.softmax(torch.randn(15, 3, dtype=torch.float64), 1)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    ref = curvature_reference.hessian_matrix(model, loss_fn, data)
    assert rel_err(HessianOperator(model, loss_fn, data).to_dense(), ref) <= 1e-10


def test_operator_follows_replaced_parameters() -> None:
    case = make_case("mlp_tanh_ce_mean")
    model = case["model"]
    for keep_graph in (True, False):
        H = HessianOperator(model, case["loss_fn"], case["data"], keep_graph=keep_graph)
        v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        H @ v
        state = {k: t + 0.1 for k, t in model.state_dict().items()}
        model.load_state_dict(state, assign=True)  # new parameter objects
        assert rel_err(H @ v, HessianOperator(model, case["loss_fn"], case["data"]) @ v) <= 1e-12
    G = GGNOperator(model, case["loss_fn"], case["data"])
    model[0].weight = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="reshaped"):
        G @ torch.ones(G.shape[0], dtype=torch.float64)


def test_switching_to_train_mode_is_refused_at_the_product() -> None:
    case = make_case("batchnorm_eval_mse_mean")
    model = case["model"]
    for keep_graph in (True, False):
        model.eval()
        H = HessianOperator(model, case["loss_fn"], case["data"], keep_graph=keep_graph)
        v = torch.ones(H.shape[0], dtype=torch.float64)
        H @ v
        model.train()
        before = snapshot(model)
        with pytest.raises(ValueError, match="model.eval"):
            H @ v
        assert_unchanged(model, before)
        model.eval()
        assert rel_err(H @ v, reference("hessian", case["name"]) @ v) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("case_name", ["mlp_tanh_ce_mean", "tied_dict_inputs_ce_sum", "loader_uneven_mse_mean",
                                       "lm_shifted_tokens_mean"])
def test_higher_precision_view_of_a_half_precision_operator(kind: str, case_name: str, dtype: torch.dtype) -> None:
    """The float32 view is the exact curvature of the half-precision model (its weights and data as they are) to
    float32 rounding, where the half-precision products are off by their dtype; the model is untouched."""
    case = make_case(case_name, dtype)
    extra = {"reduction": case["reduction"]} if kind == "empirical_fisher" and "reduction" in case else {}
    exact = OPERATORS[kind][1](case["model"], case["loss_fn"], case["data"], **extra)  # of the half model, in f64
    before = snapshot(case["model"])
    op = _build(kind, case)
    view = op.higher_precision()
    assert view.dtype == torch.float32 and view.shape == op.shape and view.is_psd == op.is_psd
    assert rel_err(view.to_dense(), exact) <= 1e-6
    assert rel_err(op.to_dense(), exact) >= 1e-4  # what the view removes
    assert (2.0 * op.damped(0.5)).higher_precision() is not None
    assert_unchanged(case["model"], before)
    assert _build(kind, make_case(case_name, torch.float32)).higher_precision() is None


def test_higher_precision_needs_a_loss_without_half_precision_tensors() -> None:
    case = make_case("ce_weighted_mean", torch.bfloat16)  # CrossEntropyLoss(weight=...) in bfloat16
    assert GGNOperator(case["model"], case["loss_fn"], case["data"]).higher_precision() is None


def test_every_registered_operator_has_its_name_title_and_dense_reference() -> None:
    assert set(curvature.operators.OPERATORS) == set(curvature.reference.REFERENCES)
    for name, cls in curvature.operators.OPERATORS.items():
        assert cls.name == name and cls.title and issubclass(cls, curvature.CurvatureOperator)
    for name, cls in curvature.operators.APPROXIMATE_OPERATORS.items():  # no dense reference of their own
        assert cls.name == name and cls.title and curvature.operators.operator_class(name) is cls
    with pytest.raises(ValueError, match=r"operator must be one of \('hessian', 'ggn', 'fisher', 'empirical_fisher', "
                       r"'kfac', 'ekfac'\)"):
        curvature.operators.operator_class("kfac2")
