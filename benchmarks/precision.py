"""Half precision: what curvature's estimators deliver in float16 and bfloat16, against float32 and float64.

For two models of the test registry (``tests/cases.py``: ``mlp_tanh_ce_mean``, P = 75, and ``cnn_ce_mean``,
P = 177; add more with ``--cases``), the model and data are cast to each dtype (parameters drawn in float32,
so the float32 and float64 models are the same function) and compared with two truths: the dense float64
Hessian of the float64 model (``curvature.reference``), and that of the model as cast, its weights and data
rounded to the dtype, which is the operator the estimators see and what ``error_bounds`` certify:

(a) λ_max by ``curvature.eigenvalues(H, k=1)`` at ``--tol`` (default 1e-3): relative error against both
    truths, the reported ``error_bounds[0] / λ``, ``converged`` and products (including the float32 products
    that certify a half-precision result). Where tol is below what the products can certify, the call warns and
    returns converged=False (the warnings are counted, not shown).
(b) The trace by Hutchinson with 100 Rademacher products: relative error, the reported standard error, and
    the rounding bias: the difference from the float64 estimate on the same probes (Rademacher probes are the
    same signs in every dtype), which removes the sampling error and leaves what the dtype's products add.
(c) Where the constant behind the estimators' rounding level (``Operand.noise``: 8 u ‖A‖ for half-precision
    products) comes from, over every Hessian and GGN of the registry: the largest error of a product
    ``‖H v − H₆₄ v‖ / (u ‖H‖ ‖v‖)`` over 8 random unit vectors, and the largest error of the top three Ritz
    values after 40 Lanczos steps (``curvature.lanczos``, float32 working precision), in units of ``u ‖H‖``,
    against the float64 eigenvalues. ``u`` is the unit roundoff of the dtype (2⁻⁸ bfloat16, 2⁻¹¹ float16,
    2⁻²⁴ float32, 2⁻⁵³ float64).
(d) The case that needs the float32 certification: the same MLP trained (Adam, lr 1e-2, full batch, float32)
    towards zero loss. The Hessian of a confident classifier is small next to the terms its forward pass rounds
    (softmax probabilities near 0 and 1), so half-precision products compute a different curvature (before the
    certification, λ_max came out 32% low in bfloat16 with a bound of 2%): λ_max in each dtype at tol=1e-5 (run
    to the rounding level), its error against the exact curvature of the model as cast (and of the float32
    model), and the reported bound.

Run (the project's own venv; a few seconds per model):

    python benchmarks/precision.py        # --cases mlp_tanh_ce_mean cnn_ce_mean --tol 1e-3 --no-registry
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _harness import environment_header  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the case registry

from cases import FACTORIES, make_case  # noqa: E402
from helpers import OPERATORS, operator_cases, reference, seeded  # noqa: E402

import curvature  # noqa: E402
from curvature.reference import hessian_matrix  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def short(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).replace("torch.", "")


def unit(dtype: torch.dtype) -> float:
    """The unit roundoff of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def hessian(name: str, dtype: torch.dtype) -> curvature.HessianOperator:
    """The Hessian operator of registry case ``name`` with model and data cast to ``dtype``."""
    case = make_case(name, dtype)
    return curvature.HessianOperator(case["model"], case["loss_fn"], case["data"])


def estimates(names: list[str], tol: float) -> None:
    """Parts (a) and (b)."""
    print(f"\n## (a) λ_max by eigenvalues(H, k=1, tol={tol:g}) and (b) trace by Hutchinson, 100 products\n")
    print("| model | dtype | λ_max rel. error (model as cast) | λ_max rel. error (float64 model) | error_bounds / λ "
          "| converged | products | trace rel. error | std_error / tr | rounding bias / tr (same probes as float64) |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for name in names:
        dense = reference("hessian", name)
        lam, tr = float(torch.linalg.eigvalsh(dense)[-1]), float(torch.trace(dense))
        base = None
        rows = []
        for dtype in reversed(DTYPES):  # float64 first: its trace estimate is the reference for the bias
            case = make_case(name, dtype)  # the model as cast: its own exact Hessian, in float64
            own = float(torch.linalg.eigvalsh(hessian_matrix(case["model"], case["loss_fn"], case["data"]))[-1])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                eig = curvature.eigenvalues(hessian(name, dtype), k=1, tol=tol, generator=seeded(0))
            est = curvature.trace(hessian(name, dtype), "hutchinson", 100, seeded(0))
            base = est.value if base is None else base
            warned = " (warned)" if any("can certify" in str(w.message) for w in caught) else ""
            rows.append(
                f"| {name} | {short(dtype)} | {abs(float(eig.values[0]) - own) / own:.1e} "
                f"| {abs(float(eig.values[0]) - lam) / lam:.1e} "
                f"| {float(eig.error_bounds[0]) / abs(float(eig.values[0])):.1e} | {eig.converged}{warned} "
                f"| {eig.num_matvecs} | {abs(est.value - tr) / abs(tr):.1e} | {est.std_error / abs(tr):.1e} "
                f"| {abs(est.value - base) / abs(tr):.1e} |"
            )
        print("\n".join(reversed(rows)))


def rounding_constants(kinds: tuple[str, ...] = ("hessian", "ggn")) -> None:
    """Part (c) over the whole registry."""
    print("\n## (c) the rounding of products and of Ritz values, in units of u ‖A‖ (all registry cases, "
          f"{', '.join(kinds)})\n")
    print("| dtype | largest product error / (u ‖A‖ ‖v‖) | its case | largest top-3 Ritz error after 40 steps "
          "/ (u ‖A‖) | its case |")
    print("|---|---:|---|---:|---|")
    pairs = [(k, c) for k, c in operator_cases() if k in kinds]
    for dtype in DTYPES:
        worst_product, worst_ritz = (0.0, ""), (0.0, "")
        for kind, name in pairs:
            dense = reference(kind, name)
            norm = float(torch.linalg.matrix_norm(dense, 2))
            case = make_case(name, dtype)
            op = OPERATORS[kind][0](case["model"], case["loss_fn"], case["data"])
            V = torch.randn(dense.shape[0], 8, dtype=torch.float64, generator=seeded(0))
            V = (V / V.norm(dim=0)).to(dtype)
            error = float(((op @ V).double() - dense @ V.double()).norm(dim=0).max()) / (unit(dtype) * norm)
            worst_product = max(worst_product, (error, f"{kind} {name}"))
            steps = min(40, dense.shape[0])
            run = curvature.lanczos(op, steps, generator=seeded(1), keep_basis=False)
            ritz = torch.linalg.eigvalsh(run.tridiagonal()).flip(0)[:3]
            exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
            error = float((ritz - exact).abs().max()) / (unit(dtype) * norm)
            worst_ritz = max(worst_ritz, (error, f"{kind} {name}"))
        print(f"| {short(dtype)} | {worst_product[0]:.2f} | {worst_product[1]} | {worst_ritz[0]:.2f} "
              f"| {worst_ritz[1]} |")


def trained(steps: tuple[int, ...] = (400, 1500, 4000)) -> None:
    """Part (d)."""
    import copy

    print("\n## (d) the registry MLP trained towards zero loss: λ_max at tol=1e-5\n")
    print("| Adam steps | loss | λ_max (float32 model, exact) | dtype | rel. error (model as cast) | error_bounds / λ "
          "| bound holds | rel. error (float32 model) | converged |")
    print("|---:|---:|---:|---|---:|---:|---|---:|---|")
    case = make_case("mlp_tanh_ce_mean", torch.float32)
    model, loss_fn, (x, y) = case["model"], case["loss_fn"], case["data"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    done = 0
    for target in steps:
        for _ in range(target - done):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        done = target
        lam = float(torch.linalg.eigvalsh(hessian_matrix(copy.deepcopy(model).double(), loss_fn, (x.double(), y)))[-1])
        for dtype in DTYPES[:3]:
            cast = copy.deepcopy(model).to(dtype)
            own = float(torch.linalg.eigvalsh(hessian_matrix(cast, loss_fn, (x.to(dtype), y)))[-1])
            op = curvature.HessianOperator(cast, loss_fn, (x.to(dtype), y))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                eig = curvature.eigenvalues(op, k=1, tol=1e-5, generator=seeded(0))
            value, bound = float(eig.values[0]), float(eig.error_bounds[0])
            print(f"| {target} | {float(loss.detach()):.1e} | {lam:.4g} | {short(dtype)} | {(value - own) / own:+.1e} "
                  f"| {bound / own:.1e} | {'yes' if abs(value - own) <= bound else 'NO'} | {(value - lam) / lam:+.1e} "
                  f"| {eig.converged} |")


def main() -> None:
    """Parse the options and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["mlp_tanh_ce_mean", "cnn_ce_mean"], choices=sorted(FACTORIES))
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-registry", action="store_true", help="skip part (c)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    environment_header()
    print("truth: the dense float64 Hessian (curvature.reference) of the model as cast to each dtype, and of the "
          "float64 model; estimators work in float32 at least (Operand.work_dtype), products in the model's dtype, "
          "half-precision results certified with float32 products (LinearOperator.higher_precision)")
    estimates(args.cases, args.tol)
    if not args.no_registry:
        rounding_constants()
    trained()


if __name__ == "__main__":
    main()
