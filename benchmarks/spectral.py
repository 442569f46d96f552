"""Spectral estimators: curvature's λ_max, trace and spectral density against PyHessian and curvlinops.

One run, the same models and data for every library (float32 products, CrossEntropyLoss with mean
reduction). Problems ``mlp`` and ``cnn``: Gaussian inputs and random labels, the model at initialization as in
benchmarks/operators.py. Problems ``mlp-trained`` and ``cnn-trained`` (part (a) only): the same MLP, and the
CNN on 8x8 images, trained on scikit-learn's ``load_digits`` (1 797 images, standardized; Adam, lr 1e-2,
batch 64, 3 epochs, seeds 0), with the Hessian taken on the first 1 024 (MLP) or ``--cnn-samples`` (CNN)
images: the curvature of a model in training, not at initialization.

(a) λ_max. Products (HVPs), seconds and relative error against a float64 / dense reference for
    ``curvature.eigenvalues(H, k=1)`` (thick-restart Lanczos; default tol=1e-3, which since the
    residual-and-gap bound is the relative error of λ_max itself), PyHessian's power iteration
    ``hessian(...).eigenvalues()`` (default maxIter=100, tol=1e-3, then with tol tightened until it lands
    within 1e-3 of the truth in every repetition), and curvlinops' ``HessianLinearOperator`` with scipy's
    ``eigsh(k=1, which="LA")``. Plus the oracle count: the first product from which Lanczos' largest Ritz
    value and the power iteration's Rayleigh quotient stay within 1e-3 of the truth.
(b) Trace. RMS relative error over seeds at equal products (30, 100, 300) for ``curvature.trace`` with
    "hutchinson", "hutch++" and "xtrace" against the exact trace, next to the mean reported standard error,
    on the MLP, the CNN and a synthetic matrix with eigenvalues k^-2; and PyHessian's ``trace()``.
(c) Density. Seconds of ``curvature.spectral_density(H, num_probes, num_steps)`` against PyHessian's
    ``density(iter, n_v)`` with the same numbers of probes and steps (PyHessian calls ``torch.eig``, which
    current torch no longer has: the crash is reported and a copy with ``torch.eig`` patched to
    ``torch.linalg.eigh`` is timed, labelled as patched), and the check that curvature's first moment is its
    trace estimate.

Every timed call starts from the model (it builds the operator, or PyHessian's ``hessian`` object on a
fresh deep copy: PyHessian switches the model to eval mode and leaves graph-carrying ``.grad``), and the
calls of a part are timed round-robin over repetitions, medians reported. Products are counted by each
library's own counter (curvature's results), by wrapping ``pyhessian.hessian.hessian_vector_product``
(the one function PyHessian's single-batch products go through), and by wrapping the scipy operator
handed to ``eigsh``.

Run (the peers are optional; their rows are skipped with a note when they are not importable):

    python benchmarks/spectral.py      # --reps 5 --seeds 10 --threads 2 --problems mlp cnn synthetic
    python benchmarks/spectral.py --parts a --problems mlp cnn mlp-trained cnn-trained   # λ_max only

The target of (a): curvature's default call within 1e-3 of λ_max in every repetition, in at most 1/3 of the
products of PyHessian's loosest call that is (``HVP_TARGET``), on the trained models in particular.

See benchmarks/README.md for the peer environment and recorded results.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from statistics import median  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse.linalg  # noqa: E402
import torch  # noqa: E402
from _common import Problem  # noqa: E402  (benchmarks/_common.py: the script's directory is on sys.path)
from _harness import SPREAD, Row, Stats, environment_header, peer_versions, print_load, round_robin  # noqa: E402
from _pyhessian import PyHessianProducts, _Enough, patched_torch_eig  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402

# The peers' own noise: curvlinops (via torch.jit.script) on import, PyHessian's loss.backward(create_graph=True).
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script. is deprecated")
warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")

try:
    import pyhessian
except ImportError:  # the project's own venv has no peers
    pyhessian = None
try:
    import curvlinops
except ImportError:
    curvlinops = None

PEER_DISTS = {"PyHessian": pyhessian, "curvlinops-for-pytorch": curvlinops}
ACCURACY = 1e-3  # (a): λ_max within this relative error of the truth
PYH_TOLS = (1e-4, 1e-5, 1e-6, 1e-7)  # (a): PyHessian's tol, tightened
PYH_MAXITER = 1000  # (a): raised from 100 for the tightened calls, so that tol (not the cap) stops them
ORACLE_CAP = 400  # (a): the longest power-iteration trajectory recorded for the oracle count
LANCZOS_ORACLE_STEPS = 80
BUDGETS = (30, 100, 300)  # (b): products per trace estimate
TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
HVP_TARGET = 1 / 3  # (a): curvature's products at most this fraction of PyHessian's
XTRACE_TARGET = 1 / 3  # (b): XTrace's RMS error at 100 products on the synthetic matrix, against Hutchinson's


# -- problems ------------------------------------------------------------------------------------------
def mlp_problem() -> Problem:
    """The MLP of benchmarks/operators.py at half width (P = 8 970), so that P float64 products are affordable."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(1024, 64)
    return Problem("MLP 64-64-64-10 (tanh)", model, nn.CrossEntropyLoss(), x, torch.randint(0, 10, (1024,)),
                   "float64 operator")


def cnn_problem(num_samples: int) -> Problem:
    """The CNN of benchmarks/operators.py (P = 3 818) on fewer images, so that its dense Hessian is affordable."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    x = torch.randn(num_samples, 1, 16, 16)
    return Problem("CNN conv8/2-conv16-pool4-linear (relu, 1x16x16)", model, nn.CrossEntropyLoss(), x,
                   torch.randint(0, 10, (num_samples,)), "dense float32")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (shipped with it, no download): 1 797 standardized 8x8 images and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-2)  # constant border pixels stay 0
    return x, torch.tensor(data.target)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3) -> nn.Module:
    """A few epochs of Adam (lr 1e-2, batch 64) with a fixed shuffling seed: a model in training."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def trained_mlp_problem() -> Problem:
    """The MLP of :func:`mlp_problem` trained on the digits; the Hessian on the first 1 024 images."""
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    train(model, x, y)
    return Problem("MLP 64-64-64-10 (tanh), trained on digits", model, nn.CrossEntropyLoss(), x[:1024], y[:1024],
                   "float64 operator")


def trained_cnn_problem(num_samples: int) -> Problem:
    """The CNN of :func:`cnn_problem` (P = 3 818) trained on the 8x8 digit images; the Hessian on the first ones."""
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    train(model, x, y)
    return Problem("CNN conv8/2-conv16-pool4-linear (relu, 1x8x8), trained on digits", model, nn.CrossEntropyLoss(),
                   x[:num_samples], y[:num_samples], "dense float32")


PROBLEMS = ("mlp", "cnn", "mlp-trained", "cnn-trained", "synthetic")


def synthetic_matrix(size: int = 1000) -> tuple[torch.Tensor, float]:
    """A dense float64 ``Q diag(k^-2) Qᵀ`` with a random orthogonal ``Q``, and its trace."""
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64)).Q
    eigs = torch.arange(1, size + 1, dtype=torch.float64).pow(-2)
    return (Q * eigs) @ Q.T, float(eigs.sum())


# -- ground truth ----------------------------------------------------------------------------------------
@dataclass
class Truth:
    """The exact λ_max and trace of a problem, how they were computed, and the dense Hessian if built."""
    lambda_max: float
    trace: float
    how: str
    seconds: float
    dense: Optional[torch.Tensor] = None  # float64, when computed: the trace study multiplies by it


def truth(pb: Problem) -> Truth:
    """λ_max and the trace, computed once.

    "float64 operator": curvature's HessianOperator on a float64 copy of model and data; λ_max by
    ``eigenvalues(tol=1e-10)``, cross-checked with scipy's ARPACK on the same operator, and the exact trace by
    ``trace(H64, "exact")`` (P products). "dense float32": the dense Hessian from P float32 products
    (float64 convolution products cost 6-13x more on this CPU), symmetrized, its eigenvalues by
    ``torch.linalg.eigvalsh`` in float64; the float32 rounding (~1e-6 relative) is far below the accuracies
    measured here.
    """
    start = time.perf_counter()
    if pb.reference == "float64 operator":
        model64, loss64 = copy.deepcopy(pb.model).double(), copy.deepcopy(pb.loss_fn).double()
        H64 = curvature.HessianOperator(model64, loss64, (pb.x.double(), pb.y))
        eig = curvature.eigenvalues(H64, k=1, tol=1e-10, generator=torch.Generator().manual_seed(0))
        lam = float(eig.values[0])
        arpack = float(scipy.sparse.linalg.eigsh(H64.to_scipy(), k=1, which="LA", tol=1e-10,
                                                 return_eigenvectors=False)[0])
        if abs(arpack - lam) > 1e-8 * abs(lam):
            raise SystemExit(f"{pb.name}: reference λ_max disagrees: Lanczos {lam!r}, ARPACK {arpack!r}")
        tr = curvature.trace(H64, "exact").value
        how = (f"float64 operator: λ_max by curvature.eigenvalues(tol=1e-10) ({eig.num_matvecs} products), equal "
               f"to scipy eigsh(tol=1e-10) to {abs(arpack - lam) / abs(lam):.0e}; trace by trace(H64, 'exact') "
               f"({pb.num_params} products)")
        return Truth(lam, tr, how, time.perf_counter() - start)
    dense = curvature.HessianOperator(*pb.args).to_dense().double()
    asym = float((dense - dense.T).abs().max() / dense.abs().max())
    dense = (dense + dense.T) / 2
    eigs = torch.linalg.eigvalsh(dense)
    how = (f"dense float32 Hessian ({pb.num_params} products, asymmetry {asym:.0e} of max|H|) symmetrized in "
           f"float64: λ_max and λ_min by eigvalsh, trace by its diagonal; λ_min = {float(eigs[0]):.4g}, "
           f"{int((eigs < 0).sum())} of {pb.num_params} eigenvalues negative")
    return Truth(float(eigs[-1]), float(dense.diagonal().sum()), how, time.perf_counter() - start, dense)


def pyhessian_object(pb: Problem, twin: nn.Module):
    """PyHessian's ``hessian`` object for the problem on ``twin``, a deep copy of the model (CPU)."""
    return pyhessian.hessian(twin, pb.loss_fn, data=(pb.x, pb.y), cuda=False)


# -- timing helpers ---------------------------------------------------------------------------------------
@dataclass
class Call:
    """One timed call: what it returned, the products it spent, its seconds."""

    value: float
    products: int
    seconds: float


def seeded_row(label: str, fn: Callable[..., tuple[float, int]],
               twin: Optional[Callable[[], nn.Module]] = None) -> Row:
    """A row whose call gets the round's seed, and with ``twin`` a fresh deep copy of the model (both untimed).

    ``fn(seed)`` or ``fn(seed, twin)`` builds everything else it needs and returns ``(value, products)``; the
    timed rounds use seeds 0, 1, ..., the warm-up rounds 999, 998, ...
    """
    def prepare(r: int) -> tuple:
        seed = r + 1000 if r < 0 else r
        return (seed,) if twin is None else (seed, twin())

    return Row(label, fn, prepare, keep=True)


def calls(row: Row) -> list[Call]:
    """The timed calls of a row made by :func:`seeded_row`."""
    return [Call(value, products, seconds) for (value, products), seconds in zip(row.results, row.seconds)]


def seconds_cell(row: Row) -> str:
    """The median seconds of a row, marked ``*`` when its seconds per product spread wide (:class:`Stats`).

    Per product, because the number of products varies with the seed; a wide spread means other processes
    took the cores during part of the repetitions.
    """
    return f"{row.median:.3f}{Stats.of([c.seconds / max(c.products, 1) for c in calls(row)]).mark}"


def ms_per_product(row: Row) -> float:
    """The median over repetitions of milliseconds per product."""
    return 1e3 * median(c.seconds / max(c.products, 1) for c in calls(row))


def clock() -> str:
    """Wall-clock time, printed with each part so that a load log can be matched to it."""
    return time.strftime("%H:%M:%S")


def rel(value: float, exact: float) -> float:
    """The signed relative error of ``value``."""
    return (value - exact) / abs(exact)


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


# -- (a) λ_max ---------------------------------------------------------------------------------------------
def curvature_lambda_rows(pb: Problem) -> list[Row]:
    """The λ_max calls of curvature: the default ``tol=1e-3``, and ``tol=1e-2``."""
    def call(tol: float) -> Callable[[int], tuple[float, int]]:
        def fn(seed: int) -> tuple[float, int]:
            H = curvature.HessianOperator(*pb.args)
            res = curvature.eigenvalues(H, k=1, tol=tol, generator=torch.Generator().manual_seed(seed))
            return float(res.values[0]), res.num_matvecs

        return fn

    return [
        seeded_row("curvature eigenvalues(H, k=1) [tol=1e-3, default]", call(1e-3)),
        seeded_row("curvature eigenvalues(H, k=1, tol=1e-2)", call(1e-2)),
    ]


def pyhessian_lambda_rows(pb: Problem, counter: PyHessianProducts) -> list[Row]:
    """PyHessian's power iteration: its default call, then with ``tol`` tightened (``maxIter`` raised)."""
    def call(kwargs: dict) -> Callable:
        def fn(seed: int, twin: nn.Module) -> tuple[float, int]:
            torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
            counter.reset()
            values, _ = pyhessian_object(pb, twin).eigenvalues(**kwargs)
            return float(values[0]), counter.count

        return fn

    def twin() -> nn.Module:
        return copy.deepcopy(pb.model)

    rows = [seeded_row("pyhessian eigenvalues() [maxIter=100, tol=1e-3, default]", call({}), twin)]
    rows += [seeded_row(f"pyhessian eigenvalues(maxIter={PYH_MAXITER}, tol={tol:.0e})",
                 call({"maxIter": PYH_MAXITER, "tol": tol}), twin) for tol in PYH_TOLS]
    return rows


def curvlinops_lambda_rows(pb: Problem) -> list[Row]:
    """The Hessian of curvlinops through scipy's ``eigsh`` (ARPACK), default ``tol=0`` and ``tol=1e-3``."""
    def call(tol: float) -> Callable[[int], tuple[float, int]]:
        def fn(seed: int) -> tuple[float, int]:
            op = curvlinops.HessianLinearOperator(pb.model, pb.loss_fn, pb.params, [(pb.x, pb.y)],
                                                  check_deterministic=False, num_data=pb.num_samples)
            A = op.to_scipy()
            count = [0]

            def matmat(X: np.ndarray) -> np.ndarray:
                count[0] += 1 if X.ndim == 1 else X.shape[1]
                return A @ X

            counted = scipy.sparse.linalg.LinearOperator(A.shape, matvec=matmat, matmat=matmat, dtype=A.dtype)
            v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
            value = scipy.sparse.linalg.eigsh(counted, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
            return float(value[0]), count[0]

        return fn

    return [
        seeded_row("curvlinops + scipy eigsh(k=1, which='LA') [tol=0, default]", call(0.0)),
        seeded_row("curvlinops + scipy eigsh(k=1, which='LA', tol=1e-3)", call(1e-3)),
    ]


def first_within(estimates: list[float], exact: float) -> Optional[int]:
    """The first product count from which every later estimate is within ACCURACY of ``exact`` (None: never)."""
    first = None
    for j, est in enumerate(estimates, start=1):
        if abs(rel(est, exact)) <= ACCURACY:
            first = first or j
        else:
            first = None
    return first


def lanczos_oracle(pb: Problem, exact: float, seed: int) -> Optional[int]:
    """Products after which the largest Ritz value of plain Lanczos stays within ACCURACY (it only grows)."""
    steps = min(LANCZOS_ORACLE_STEPS, pb.num_params)
    run = curvature.lanczos(curvature.HessianOperator(*pb.args), steps, generator=torch.Generator().manual_seed(seed),
                            keep_basis=False)
    T = run.tridiagonal()
    return first_within([float(torch.linalg.eigvalsh(T[:j, :j])[-1]) for j in range(1, run.num_steps + 1)], exact)


def power_oracle(pb: Problem, exact: float, seed: int, counter: PyHessianProducts) -> Optional[int]:
    """Products after which PyHessian's Rayleigh quotient stays within ACCURACY (10 more products confirm it)."""

    def stop(q: list[float]) -> bool:
        return len(q) >= 10 and all(abs(rel(e, exact)) <= ACCURACY for e in q[-10:])

    torch.manual_seed(seed)
    counter.reset(record=True, stop=stop)
    try:
        pyhessian_object(pb, copy.deepcopy(pb.model)).eigenvalues(maxIter=ORACLE_CAP, tol=0.0)
    except _Enough:
        pass
    quotients = counter.quotients
    counter.reset()
    return first_within(quotients, exact)


def lambda_part(pb: Problem, tr: Truth, reps: int, warmup: int, counter: Optional[PyHessianProducts]) -> list[tuple]:
    """Part (a); returns the target checks as (description, value, bound, ok)."""
    print(f"\n### (a) λ_max: exact {tr.lambda_max:.8g}, accuracy target {ACCURACY:.0e} relative [{clock()}]\n")
    rows = curvature_lambda_rows(pb)
    if pyhessian is None:
        print("note: pyhessian is not importable: its rows are skipped.")
    else:
        rows += pyhessian_lambda_rows(pb, counter)
    if curvlinops is None:
        print("note: curvlinops is not importable: its rows are skipped.")
    else:
        rows += curvlinops_lambda_rows(pb)
    round_robin(rows, reps, warmup)
    base = rows[0].median
    print(f"| call | HVPs median (min-max) | seconds median | x curvature default | ms per HVP | rel. error median "
          f"| worst abs. rel. error | within {ACCURACY:.0e} in all {reps} |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        hv = [c.products for c in calls(row)]
        errs = [rel(c.value, tr.lambda_max) for c in calls(row)]
        worst = max(abs(e) for e in errs)
        sec = row.median
        print(f"| {row.label} | {median(hv):g} ({min(hv)}-{max(hv)}) | {seconds_cell(row)} | {sec / base:.2f} "
              f"| {ms_per_product(row):.2f} | {median(errs):+.1e} | {worst:.1e} "
              f"| {'yes' if worst <= ACCURACY else 'no'} |")

    ours = rows[0]
    ours_hvps = median(c.products for c in calls(ours))
    ours_ok = all(abs(rel(c.value, tr.lambda_max)) <= ACCURACY for c in calls(ours))
    checks = [("curvature default within 1e-3 of λ_max in every repetition", float(ours_ok), 1.0, ours_ok)]
    oracle_l = [lanczos_oracle(pb, tr.lambda_max, seed) for seed in range(reps)]
    print(f"\noracle, products after which the estimate stays within {ACCURACY:.0e} (seeds 0-{reps - 1}):")
    print(f"  Lanczos (curvature.lanczos, largest Ritz value, no restart): {oracle_l}")
    if pyhessian is not None:
        oracle_p = [power_oracle(pb, tr.lambda_max, seed, counter) for seed in range(reps)]
        print(f"  power iteration (PyHessian, Rayleigh quotient v·Hv, cap {ORACLE_CAP}): {oracle_p}")
        pyh_rows = [r for r in rows if r.label.startswith("pyhessian")]
        good = [r for r in pyh_rows if all(abs(rel(c.value, tr.lambda_max)) <= ACCURACY for c in calls(r))]
        if good:
            theirs = median(c.products for c in calls(good[0]))
            ratio = ours_hvps / theirs
            print(f"\nPyHessian's loosest call within {ACCURACY:.0e} in every repetition: {good[0].label}, "
                  f"{theirs:g} HVPs (median), {good[0].median:.3f} s")
            checks.append((f"HVPs as called: curvature default / {good[0].label}", ratio, HVP_TARGET,
                           ratio <= HVP_TARGET))
            t_ratio = base / good[0].median
            print(f"time ratio (curvature default / that call): {t_ratio:.2f}")
        else:
            checks.append(("HVPs as called: PyHessian never got within 1e-3", math.nan, HVP_TARGET, False))
        if None not in oracle_l and None not in oracle_p:
            ratio = median(oracle_l) / median(oracle_p)
            checks.append(("HVPs, oracle: Lanczos / power iteration (medians)", ratio, HVP_TARGET, ratio <= HVP_TARGET))
    return checks


# -- (b) trace ---------------------------------------------------------------------------------------------
@dataclass
class TraceStats:
    """One row of a trace table: an estimator's accuracy over seeds."""
    label: str
    products: float
    rms: float  # RMS relative error over seeds
    mean_se: float  # mean reported std_error, relative to |exact|
    seconds: float
    mean_value: float
    products_range: Optional[tuple[int, int]] = None


def trace_stats(label: str, estimates: list, seconds: list[float], exact: float) -> TraceStats:
    """Summarize estimates (objects with ``value``, ``std_error``, ``num_matvecs``) against the exact trace."""
    rms = math.sqrt(sum(rel(e.value, exact) ** 2 for e in estimates) / len(estimates))
    se = statistics.fmean(e.std_error for e in estimates) / abs(exact)
    return TraceStats(label, median(e.num_matvecs for e in estimates), rms, se, median(seconds),
                      statistics.fmean(e.value for e in estimates))


def curvature_trace_study(op, exact: float, seeds: int, budgets=BUDGETS) -> dict[tuple[str, int], TraceStats]:
    """Every trace method at every budget over ``seeds`` seeds, keyed ``(method, budget)``."""
    out = {}
    for m in budgets:
        for method in TRACE_METHODS:
            ests, secs = [], []
            for seed in range(seeds):
                start = time.perf_counter()
                ests.append(curvature.trace(op, method, m, generator=torch.Generator().manual_seed(seed)))
                secs.append(time.perf_counter() - start)
            out[method, m] = trace_stats(f"curvature trace({method!r}, {m})", ests, secs, exact)
    return out


@dataclass
class _Value:
    value: float
    std_error: float
    num_matvecs: int


def pyhessian_trace(pb: Problem, exact: float, seeds: int, counter: PyHessianProducts) -> TraceStats:
    """PyHessian's default ``trace()`` over ``seeds`` seeds (its value: the mean of the samples it returns)."""
    ests, secs = [], []
    for seed in range(seeds):
        twin = copy.deepcopy(pb.model)
        torch.manual_seed(seed)
        counter.reset()
        start = time.perf_counter()
        samples = pyhessian_object(pb, twin).trace()
        secs.append(time.perf_counter() - start)
        if counter.count != len(samples):
            raise SystemExit(f"PyHessian's trace: {counter.count} products counted, {len(samples)} samples")
        se = statistics.stdev(samples) / math.sqrt(len(samples)) if len(samples) > 1 else math.inf
        ests.append(_Value(float(np.mean(samples)), se, len(samples)))
    stats = trace_stats("pyhessian trace() [maxIter=100, tol=1e-3, default]", ests, secs, exact)
    stats.products_range = (min(e.num_matvecs for e in ests), max(e.num_matvecs for e in ests))
    return stats


def hutchinson_exact_error(A: torch.Tensor, exact: float) -> str:
    """Hutchinson's exact RMS relative error with Rademacher probes, ``sqrt(2 (‖A‖_F² − Σ A_ii²) / m) / |tr A|``."""
    var = 2 * float(A.pow(2).sum() - A.diagonal().pow(2).sum())
    return ", ".join(f"{m}: {math.sqrt(var / m) / abs(exact):.2e}" for m in BUDGETS)


def resolved_factor(seeds: int) -> float:
    """The ratio of two RMS errors over ``seeds`` seeds that is two standard deviations away from 1.

    An RMS over n seeds has a relative standard deviation of about 1/√(2n), a ratio of two independent ones
    about 1/√n.
    """
    return 1 + 2 / math.sqrt(seeds)


def print_uncertainty(seeds: int) -> None:
    """Say how far an RMS over ``seeds`` seeds can be trusted."""
    print(f"(an RMS over {seeds} seeds is itself uncertain by about ±{100 / math.sqrt(2 * seeds):.0f}%: "
          f"a ratio below {resolved_factor(seeds):.2f} between two rows is within noise)")


@dataclass
class Ranking:
    """The trace methods at one budget, ranked by RMS error."""
    budget: int
    best: str  # the method with the lowest RMS error
    runner_up: str
    ratio: float  # runner-up's RMS / best's
    resolved: bool  # ratio beyond noise
    hutchinson_beaten: bool  # Hutchinson's RMS / best's beyond noise
    best_by_se: str  # the method with the lowest mean reported std_error


def rank_methods(study: dict, seeds: int) -> list[Ranking]:
    """Rank the trace methods per budget, with ties within sampling noise marked."""
    out = []
    for m in BUDGETS:
        order = sorted(TRACE_METHODS, key=lambda meth: study[meth, m].rms)
        best_rms = study[order[0], m].rms
        ratio = study[order[1], m].rms / best_rms
        out.append(Ranking(
            m, order[0], order[1], ratio, ratio > resolved_factor(seeds),
            study["hutchinson", m].rms / best_rms > resolved_factor(seeds),
            min(TRACE_METHODS, key=lambda meth: study[meth, m].mean_se),
        ))
    return out


def describe_ranking(ranking: list[Ranking]) -> str:
    """One line per budget: the winner, whether it is resolved, the lowest mean std_error."""
    return "; ".join(
        f"{r.budget}: {r.best} ({'resolved' if r.resolved else f'tie with {r.runner_up} within noise'}, next "
        f"{r.ratio:.2f}x; lowest mean std_error: {r.best_by_se})"
        for r in ranking
    )


def print_trace_table(stats: list[TraceStats], timed: bool) -> None:
    """Print trace rows as a markdown table."""
    print("| estimator | products | RMS rel. error | mean reported std_error (rel.) | RMS / std_error "
          f"| {'seconds median' if timed else 'seconds median (dense products)'} |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in stats:
        products = f"{s.products:g}"
        if s.products_range is not None:
            products += " ({}-{})".format(*s.products_range)
        print(f"| {s.label} | {products} | {s.rms:.2e} | {s.mean_se:.2e} | {s.rms / s.mean_se:.2f} | {s.seconds:.3f} |")


def trace_part(pb: Problem, tr: Truth, seeds: int, counter: Optional[PyHessianProducts]) -> list[Ranking]:
    """Part (b) on a model; returns the ranking of the methods per budget."""
    H = curvature.HessianOperator(*pb.args)
    if tr.dense is not None:
        # The dense Hessian already exists (the reference): its products are cheaper than the CNN's HVPs and
        # give the same estimates; check one against the operator.
        a = curvature.trace(H, "xtrace", 30, generator=torch.Generator().manual_seed(0)).value
        b = curvature.trace(tr.dense, "xtrace", 30, generator=torch.Generator().manual_seed(0)).value
        print(f"\n### (b) trace: exact {tr.trace:.8g}; estimates over {seeds} seeds with the dense float64 "
              f"Hessian as the operator (xtrace(30), seed 0: operator {a:.6g}, dense {b:.6g}, "
              f"rel. diff {abs(a - b) / abs(b):.0e}) [{clock()}]\n")
        op = tr.dense
    else:
        print(f"\n### (b) trace: exact {tr.trace:.8g}; estimates over {seeds} seeds with the float32 operator "
              f"[{clock()}]\n")
        op = H
        op @ torch.zeros(pb.num_params)  # build the kept graph outside the timings
    study = curvature_trace_study(op, tr.trace, seeds)
    rows = [study[key] for key in sorted(study, key=lambda k: (k[1], TRACE_METHODS.index(k[0])))]
    if pyhessian is None:
        print("note: pyhessian is not importable: its trace row is skipped.")
    else:
        pyh = pyhessian_trace(pb, tr.trace, seeds, counter)
        rows.append(pyh)
        m = max(2, int(round(pyh.products)))
        ests, secs = [], []
        for seed in range(seeds):
            start = time.perf_counter()
            ests.append(curvature.trace(H, "hutchinson", m, generator=torch.Generator().manual_seed(seed)))
            secs.append(time.perf_counter() - start)
        rows.append(trace_stats(f"curvature trace('hutchinson', {m}) (PyHessian's median count; operator)",
                                ests, secs, tr.trace))
    print_trace_table(rows, timed=tr.dense is None)
    print()
    print_uncertainty(seeds)
    if tr.dense is not None:
        print("Seconds: of dense products for curvature's rows on the dense matrix; PyHessian and the row marked "
              "'operator' multiply through the model.")
        print(f"Hutchinson's exact RMS rel. error (no sampling noise): {hutchinson_exact_error(tr.dense, tr.trace)}")
    if pyhessian is not None:
        print("PyHessian returns the list of its samples vᵀHv: its value is their mean, its std_error is computed "
              "here from them (sample std / √n).")
    ranking = rank_methods(study, seeds)
    print(f"\nlowest RMS error per budget: {describe_ranking(ranking)}")
    return ranking


def synthetic_part(seeds: int) -> list[tuple]:
    """Part (b) on the synthetic k^-2 matrix; returns the XTrace target check."""
    A, exact = synthetic_matrix()
    print(f"\n## Synthetic: dense float64 Q diag(k^-2) Qᵀ, P = {A.shape[0]}, trace {exact:.8g}\n")
    study = curvature_trace_study(A, exact, seeds)
    print_trace_table([study[key] for key in sorted(study, key=lambda k: (k[1], TRACE_METHODS.index(k[0])))],
                      timed=True)
    print()
    print_uncertainty(seeds)
    print(f"Hutchinson's exact RMS rel. error (no sampling noise): {hutchinson_exact_error(A, exact)}")
    ratio = study["xtrace", 100].rms / study["hutchinson", 100].rms
    print(f"XTrace / Hutchinson RMS error at 100 products: {ratio:.3f}")
    return [("synthetic k^-2: XTrace RMS error / Hutchinson's at 100 products", ratio, XTRACE_TARGET,
             ratio <= XTRACE_TARGET)]


# -- (c) density ---------------------------------------------------------------------------------------
def density_part(pb: Problem, tr: Truth, reps: int, warmup: int, probes: int, steps: int,
                 counter: Optional[PyHessianProducts]) -> list[tuple]:
    """Part (c); returns the checks as (description, value, bound, ok)."""
    print(f"\n### (c) spectral density: {probes} probes x {steps} Lanczos steps [{clock()}]\n")
    last = {}

    def ours(seed: int) -> tuple[float, int]:
        H = curvature.HessianOperator(*pb.args)
        density = curvature.spectral_density(H, num_probes=probes, num_steps=steps,
                                             generator=torch.Generator().manual_seed(seed))
        last["curvature"] = density
        return density.trace_estimate().value, density.num_matvecs

    rows = [seeded_row("curvature spectral_density(H, num_probes, num_steps)", ours)]
    crash = None
    if pyhessian is None:
        print("note: pyhessian is not importable: its rows are skipped.")
    else:
        # Unpatched first: on torch >= 2.0 it fails at torch.eig after the first probe's Lanczos.
        counter.reset()
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pyhessian_object(pb, copy.deepcopy(pb.model)).density(iter=steps, n_v=probes)
        except Exception as exc:  # noqa: BLE001 - report whatever it is
            crash = (f"{type(exc).__name__}: {str(exc).split('. ')[0][:120]}", counter.count,
                     time.perf_counter() - start)

        def theirs(seed: int, twin: nn.Module) -> tuple[float, int]:
            torch.manual_seed(seed)
            counter.reset()
            with patched_torch_eig():
                nodes, weights = pyhessian_object(pb, twin).density(iter=steps, n_v=probes)
            last["pyhessian"] = (nodes, weights)
            moment = statistics.fmean(float(np.dot(n, w)) for n, w in zip(nodes, weights))
            return pb.num_params * moment, counter.count

        label = "pyhessian density(iter, n_v), torch.eig patched to torch.linalg.eigh"
        rows.append(seeded_row(label if crash else "pyhessian density(iter, n_v)", theirs,
                        lambda: copy.deepcopy(pb.model)))
    round_robin(rows, reps, warmup)
    base = rows[0].median
    print("| call | products | seconds median | x curvature | trace from the first moment (rel. error, "
          "median) | largest node (rel. error to λ_max, last run) |")
    print("|---|---:|---:|---:|---:|---:|")
    top = {"curvature": float(last["curvature"].nodes.max())}
    if "pyhessian" in last:
        top["pyhessian"] = max(max(n) for n in last["pyhessian"][0])
    for row, key in zip(rows, ("curvature", "pyhessian")):
        sec = row.median
        print(f"| {row.label} | {median(c.products for c in calls(row)):g} | {seconds_cell(row)} | {sec / base:.2f} "
              f"| {median(rel(c.value, tr.trace) for c in calls(row)):+.2e} | {rel(top[key], tr.lambda_max):+.1e} |")
    if crash:
        print(f"\nunpatched PyHessian density: {crash[0]} after {crash[1]} products, {crash[2]:.3f} s")
    elif pyhessian is not None:
        print("\nunpatched PyHessian density ran (this torch still has torch.eig)")

    # First moment and trace estimate: the same number, and equal to Hutchinson on the same probes.
    seed = reps - 1
    density = last["curvature"]
    est = density.trace_estimate()
    moment = pb.num_params * density.moment(1)
    hutch = curvature.trace(curvature.HessianOperator(*pb.args), "hutchinson", probes,
                            generator=torch.Generator().manual_seed(seed))
    d1 = abs(moment - est.value) / abs(est.value)
    d2 = abs(hutch.value - est.value) / abs(est.value)
    print(f"\ncurvature, seed {seed}: P·moment(1) = {moment:.8g}, trace_estimate() = {est.value:.8g} ± "
          f"{est.std_error:.2g} (exact {tr.trace:.8g}, error {rel(est.value, tr.trace):+.2e}), "
          f"trace('hutchinson', {probes}) on the same probes = {hutch.value:.8g}; rel. differences "
          f"{d1:.0e} and {d2:.0e}")
    ok = d1 <= 1e-12 and d2 <= 1e-4
    checks = [("density: first moment = trace estimate = Hutchinson on the same probes", max(d1, d2), 1e-4, ok)]
    if len(rows) > 1:
        ratio = base / rows[1].median
        checks.append(("density time: curvature / PyHessian (info, no target)", ratio, math.inf, True))
    return checks


# -- main ------------------------------------------------------------------------------------------------
def model_snapshot(model: nn.Module) -> dict:
    """Copies of the model's parameters and buffers."""
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def check_unchanged(pb: Problem, snapshot: dict, training: bool) -> bool:
    """Whether the model's state, ``.grad`` and train mode are as before."""
    state = pb.model.state_dict()
    same = all(torch.equal(state[n], t) for n, t in snapshot.items())
    return same and all(p.grad is None for p in pb.model.parameters()) and pb.model.training == training


def main() -> None:
    """Parse the options, run the parts for each problem and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (seeds) of the timed calls in (a), (c)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=20, help="seeds per trace estimate in (b)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS,
                        help="the trained ones run part (a) only")
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"],
                        help="(a) λ_max, (b) trace (with the synthetic matrix), (c) density")
    parser.add_argument("--cnn-samples", type=int, default=256)
    parser.add_argument("--density-probes", type=int, default=3)
    parser.add_argument("--density-steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    environment_header(f"scipy {scipy.__version__}", f"peers: {peer_versions(PEER_DISTS)}")
    print(f"cpu, float32 products; (a) and (c): {args.reps} round-robin repetitions (seeds 0-{args.reps - 1}), "
          f"medians; (b): {args.seeds} seeds")
    print(f"seconds marked * have q3 > {SPREAD:g} q1 over the repetitions: other processes competed for the cores")
    counter = PyHessianProducts() if pyhessian is not None else None
    checks: list[tuple[str, str, float, float, bool]] = []
    best: dict[str, list[Ranking]] = {}
    started = time.perf_counter()
    with counter.installed() if counter is not None else nullcontext():
        for name in args.problems:
            if name == "synthetic":
                if "b" in args.parts:
                    checks += [("synthetic", *c) for c in synthetic_part(args.seeds)]
                continue
            torch.manual_seed(0)
            pb = {"mlp": mlp_problem, "cnn": lambda: cnn_problem(args.cnn_samples), "mlp-trained": trained_mlp_problem,
                  "cnn-trained": lambda: trained_cnn_problem(args.cnn_samples)}[name]()
            parts = ["a"] if name.endswith("-trained") else args.parts
            snapshot, training = model_snapshot(pb.model), pb.model.training
            print(f"\n## {pb.name}: P = {pb.num_params}, N = {pb.num_samples} [{clock()}]")
            tr = truth(pb)
            print(f"\nreference ({tr.seconds:.1f} s): {tr.how}")
            print(f"λ_max = {tr.lambda_max:.10g}, trace = {tr.trace:.10g}")
            tag = pb.name.split()[0] + (" trained" if name.endswith("-trained") else "")
            if "a" in parts:
                checks += [(tag, *c) for c in lambda_part(pb, tr, args.reps, args.warmup, counter)]
            if "b" in parts:
                best[tag] = trace_part(pb, tr, args.seeds, counter)
            if "c" in parts:
                checks += [(tag, *c) for c in density_part(pb, tr, args.reps, args.warmup, args.density_probes,
                                                            args.density_steps, counter)]
            ok = check_unchanged(pb, snapshot, training)
            checks.append((tag, "model unchanged (parameters, .grad, train mode; PyHessian got deep copies)",
                           float(ok), 1.0, ok))
    print()
    print_load()
    print(f"total {time.perf_counter() - started:.0f} s [{clock()}]")
    print("\n# summary")
    for tag, desc, value, bound, ok in checks:
        if math.isinf(bound):
            print(f"  [info] [{tag}] {desc}: {value:.2f}")
        elif bound == 1.0 and value in (0.0, 1.0):
            print(f"  [{verdict(ok)}] [{tag}] {desc}")
        else:
            print(f"  [{verdict(ok)}] [{tag}] {desc}: {value:.3g} (bound {bound:.3g})")
    for tag, ranking in best.items():
        print(f"  [info] [{tag}] lowest trace RMS error per budget: {describe_ranking(ranking)}")
        beaten = [r.budget for r in ranking if r.hutchinson_beaten]
        print(f"  [info] [{tag}] the default 'hutchinson': "
              + ("lowest or tied at every budget" if not beaten else f"beaten at {beaten} products"))


if __name__ == "__main__":
    main()
