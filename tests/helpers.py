"""Small test utilities shared by the test modules."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import curvature

# Every registered operator with its dense reference: the two registries the library keeps.
OPERATORS = {name: (cls, curvature.reference.REFERENCES[name]) for name, cls in curvature.operators.OPERATORS.items()}


@functools.cache
def reference(kind: str, case_name: str) -> torch.Tensor:
    """The dense float64 reference of operator ``kind`` on registry case ``case_name``, computed once."""
    from cases import make_case

    case = make_case(case_name, torch.float64)
    extra = {"reduction": case["reduction"]} if kind == "empirical_fisher" and "reduction" in case else {}
    return OPERATORS[kind][1](case["model"], case["loss_fn"], case["data"], **extra)


def operator_cases() -> list[tuple[str, str]]:
    """Every (operator kind, case name) pair that is defined: the Fisher only for likelihood losses."""
    from cases import FACTORIES, make_case

    likelihood = {name: make_case(name)["likelihood"] for name in FACTORIES}
    return [(k, c) for k in sorted(OPERATORS) for c in sorted(FACTORIES) if k != "fisher" or likelihood[c]]


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed: the only source of randomness the estimators are given."""
    return torch.Generator().manual_seed(seed)


def build(kind: str, case_name: str, dtype: torch.dtype = torch.float64) -> Any:
    """Operator ``kind`` on a fresh copy of registry case ``case_name``."""
    from cases import make_case

    case = make_case(case_name, dtype)
    return OPERATORS[kind][0](case["model"], case["loss_fn"], case["data"])


def watched(kind: str, case_name: str = "batchnorm_eval_mse_mean") -> tuple[nn.Module, Any, dict[str, Any]]:
    """A case's model with pending ``.grad`` everywhere, its operator ``kind``, and a snapshot of the model."""
    from cases import make_case

    case = make_case(case_name, torch.float64)
    model = case["model"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    return model, OPERATORS[kind][0](model, case["loss_fn"], case["data"]), before


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a curvature computation must leave unchanged."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """Assert bit-for-bit equality with a :func:`snapshot`."""
    after = snapshot(model)
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name in before[key]:
            assert torch.equal(before[key][name], after[key][name]), f"{key} {name} changed"
    assert before["requires_grad"] == after["requires_grad"]
    for name, grad in before["grads"].items():
        new = after["grads"][name]
        assert (grad is None and new is None) or torch.equal(grad, new), f".grad of {name} changed"
    assert before["modes"] == after["modes"], "train/eval flags changed"
    assert torch.equal(before["rng"], after["rng"]), "the global RNG state changed"


def full_data_closure(case: dict[str, Any], model: nn.Module | None = None) -> Any:
    """A closure returning the case's loss over all its data at once (the function the operators describe)."""
    from curvature.operators.data import Data
    from curvature.reference import _cat

    batches = list(Data(case["data"]))
    inputs, targets = _cat([b[0] for b in batches]), _cat([b[1] for b in batches])
    model = case["model"] if model is None else model

    def closure() -> torch.Tensor:
        if isinstance(inputs, dict):
            outputs = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            outputs = model(*inputs)
        else:
            outputs = model(inputs)
        return case["loss_fn"](outputs, targets)

    return closure


# Tensor methods and torch functions that hand a value to the host: each one waits for the device to finish
# the work queued so far (a host synchronisation on a GPU). `any`/`all` are not listed: they only sync once
# their result is read (`__bool__`, `item`), which is counted then.
HOST_SYNCS = frozenset({
    "item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "__format__", "equal", "allclose", "is_nonzero", "nonzero", "cpu",
})


@dataclass
class HostSyncs:
    """What :func:`count_host_syncs` saw: ``calls`` holds the name of each host read, in order."""

    calls: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)


class _CountHostSyncs(TorchFunctionMode):
    def __init__(self, record: HostSyncs) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_SYNCS or (name in ("to", "copy_") and _to_host(name, args, kwargs)):
            self.record.calls.append(name)
        return func(*args, **kwargs)


def _to_host(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to`` / ``Tensor.copy_`` moves data from an accelerator to the CPU."""
    if name == "copy_":
        dst, src = args[0], args[1] if len(args) > 1 else kwargs.get("src")
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    source = args[0]
    target = kwargs.get("device")
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)):
            target = arg
        elif isinstance(arg, torch.Tensor):
            target = arg.device
    return target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu"


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count the device-to-host reads (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ...).

    A :class:`torch.overrides.TorchFunctionMode` sees every such call, also on CPU tensors, so a test on the
    CPU proves what would synchronize a GPU: an estimator whose count does not grow with its number of
    products never waits for the device inside its loop. Reads inside C++ kernels (boolean-mask indexing)
    are not seen.

    Example:
        with count_host_syncs() as syncs:
            curvature.trace(op, num_matvecs=20)
        print(syncs.count, syncs.calls)
    """
    record = HostSyncs()
    with _CountHostSyncs(record):
        yield record
