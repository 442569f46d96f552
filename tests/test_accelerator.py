"""The GPU paths of the operators, checked on the CPU: no host reads per product, TF32 only when asked.

A GPU waits for nothing as long as the host never reads a value back. ``count_host_syncs`` sees every
such read (``.item()``, ``bool(t)``, ``.tolist()``, ...) on CPU tensors too, so these tests prove on any
machine what ``verify=False`` (the default on accelerators) leaves out of the product loop.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from cases import make_case
from helpers import OPERATORS, count_host_syncs, operator_cases, rel_err, seeded

import curvature
from curvature._modes import float32_precision


@pytest.mark.parametrize(("kind", "case_name"), operator_cases())
def test_kept_graph_products_read_nothing_on_the_host(kind: str, case_name: str) -> None:
    case = make_case(case_name)
    cls = OPERATORS[kind][0]
    quiet = cls(case["model"], case["loss_fn"], case["data"], keep_graph=True, verify=False)
    checked = cls(case["model"], case["loss_fn"], case["data"], keep_graph=True)
    assert not quiet.verify and checked.verify  # verify defaults to True on the CPU
    V = torch.randn(quiet.shape[0], 3, generator=seeded(0), dtype=torch.float64)
    quiet @ V  # builds the kept graphs: reading the targets' counts there is once per set of graphs
    for product in (lambda: quiet @ V, lambda: quiet @ V[:, 0], lambda: quiet.matmat(V)):
        with count_host_syncs() as syncs:
            product()
        assert syncs.count == 0, syncs.calls
    with count_host_syncs() as syncs:
        checked @ V
    assert syncs.count >= 1  # the checksum and the finiteness check: the counter sees them
    assert rel_err(quiet @ V, checked @ V) == 0.0


def test_without_verify_in_place_updates_still_rebuild_the_graphs() -> None:
    case = make_case("mlp_tanh_ce_mean")
    model = case["model"]
    H = curvature.HessianOperator(model, case["loss_fn"], case["data"], verify=False)
    v = torch.randn(H.shape[0], generator=seeded(1), dtype=torch.float64)
    H @ v
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # an in-place update bumps the version counter: seen without reading values
    fresh = curvature.HessianOperator(model, case["loss_fn"], case["data"])
    assert rel_err(H @ v, fresh @ v) < 1e-14
    with torch.no_grad():
        model[0].weight.data.mul_(0.5)  # through .data: invisible to version counters, so clear_cache()
    H.clear_cache()
    fresh = curvature.HessianOperator(model, case["loss_fn"], case["data"])
    assert rel_err(H @ v, fresh @ v) < 1e-14


def test_without_verify_a_non_finite_product_is_returned_not_raised() -> None:
    case = make_case("mlp_tanh_ce_mean")
    x, y = case["data"]
    model = case["model"]
    H = curvature.HessianOperator(model, case["loss_fn"], (x, y), verify=False)
    checked = curvature.HessianOperator(model, case["loss_fn"], (x, y))
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert not torch.isfinite(H @ v).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        checked @ v


TF32_FLAGS = ("matmul", "conv", "rnn")


def tf32_state() -> tuple[str, ...]:
    backends = torch.backends
    return (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
            backends.cudnn.rnn.fp32_precision)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="PyTorch < 2.9 flags")
@pytest.mark.parametrize("allow", [False, True])
def test_float32_precision_switches_tf32_for_cuda_float32_only_and_restores(allow: bool) -> None:
    before = tf32_state()  # PyTorch's defaults: cuDNN convolutions may use TF32
    with float32_precision(torch.device("cuda"), torch.float32, allow):
        assert tf32_state() == ("tf32" if allow else "ieee",) * len(TF32_FLAGS)
    assert tf32_state() == before
    for device, dtype in ((torch.device("cpu"), torch.float32), (torch.device("cuda"), torch.float64)):
        with float32_precision(device, dtype, allow):
            assert tf32_state() == before
    with pytest.raises(RuntimeError, match="inside"), float32_precision(torch.device("cuda"), torch.float32, allow):
        raise RuntimeError("inside")
    assert tf32_state() == before


def test_allow_tf32_must_be_a_bool() -> None:
    case = make_case("mlp_tanh_ce_mean")
    with pytest.raises(TypeError, match="allow_tf32"):
        curvature.GGNOperator(case["model"], case["loss_fn"], case["data"], allow_tf32=1)
    with pytest.raises(TypeError, match="verify"):
        curvature.GGNOperator(case["model"], case["loss_fn"], case["data"], verify="yes")


@pytest.mark.parametrize("granularity", ["weight", "channel", "layer"])
def test_pruning_sensitivity_reads_do_not_grow_with_products(granularity: str) -> None:
    """HAP's Hutchinson pass keeps a GPU busy too: its host reads do not depend on the number of probes."""
    counts = []
    for num_matvecs in (16, 64):
        case = make_case("cnn_ce_mean")
        with count_host_syncs() as syncs:
            curvature.pruning.sensitivity(case["model"], case["loss_fn"], case["data"], "hap", granularity,
                                          num_matvecs, seeded(0), verify=False)
        counts.append(syncs.count)
    assert counts[0] == counts[1], counts


class _NoVmapTanh(torch.autograd.Function):
    """tanh whose backward branches on the data: vmap cannot batch it, so vectorized products fall back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if bool((grad != 0).any()):  # data-dependent control flow
            return grad * (1 - x.tanh() ** 2)
        return grad * 0


class _NoVmapMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(_NoVmapTanh.apply(self.first(x)))


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_vectorized_fallback_without_kept_graphs(kind: str) -> None:
    """The GPU defaults with a loader (vectorize=True, keep_graph=False): a graph freed on its last use must
    still be whole when vmap fails and the column loop takes over."""
    torch.manual_seed(0)
    model = _NoVmapMLP().double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    cls = OPERATORS[kind][0]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=seeded(2), dtype=torch.float64)
    looped = cls(model, torch.nn.CrossEntropyLoss(), data, vectorize=False, keep_graph=False) @ V
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time fallback warning
        vectorized = cls(model, torch.nn.CrossEntropyLoss(), data, vectorize=True, keep_graph=False) @ V
    assert rel_err(vectorized, looped) < 1e-14


def test_data_parallel_model_accepts_prefixed_names() -> None:
    case = make_case("mlp_tanh_ce_mean")
    model, loss_fn, data = case["model"], case["loss_fn"], case["data"]
    wrapped = curvature.HessianOperator(torch.nn.DataParallel(model), loss_fn, data, params=["module.2.weight"])
    plain = curvature.HessianOperator(model, loss_fn, data, params=["2.weight"])
    v = torch.randn(plain.shape[0], generator=seeded(3), dtype=torch.float64)
    assert torch.equal(wrapped @ v, plain @ v)
