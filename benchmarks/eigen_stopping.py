"""What the eigenvalue stopping rule costs over the test registry: products and errors of λ_max at two tolerances.

For every Hessian and GGN of the case registry (``tests/cases.py``, dense float64 references from
``curvature.reference``), ``curvature.eigenvalues(A, k=1, tol=tol)`` with seeds 0-2 at ``tol`` = 1e-3 and 1e-6:
the products spent in total, how many runs missed ``tol`` in true relative error, and the worst relative error.
The dense matrices are saved to ``--dense`` on the first run, so that another version of the library (an older
commit on ``PYTHONPATH``, whose test registry may lack newer cases) is measured on exactly the same operators:

    python benchmarks/eigen_stopping.py --dense /tmp/dense.pt                    # this tree; writes the file
    PYTHONPATH=/path/to/old/tree python benchmarks/eigen_stopping.py --dense /tmp/dense.pt   # reads it
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _harness import environment_header  # noqa: E402

import curvature  # noqa: E402


def dense_operators(path: Path) -> dict[str, torch.Tensor]:
    """The dense float64 Hessian and GGN of every registry case, read from ``path`` or computed and saved there."""
    if path.exists():
        return torch.load(path)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import operator_cases, reference

    found = {f"{kind}/{case}": reference(kind, case) for kind, case in operator_cases() if kind in ("hessian", "ggn")}
    torch.save(found, path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=Path("eigen_stopping_dense.pt"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    environment_header(f"seeds {args.seeds}")
    dense = dense_operators(args.dense)
    print(f"curvature {curvature.__version__} from {Path(curvature.__file__).parent}")
    for tol in (1e-3, 1e-6):
        total = missed = 0
        worst = 0.0
        for A in dense.values():
            lam = float(torch.linalg.eigvalsh(A)[-1])
            for seed in range(args.seeds):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = curvature.eigenvalues(A, k=1, tol=tol, generator=torch.Generator().manual_seed(seed))
                total += result.num_matvecs
                error = abs(float(result.values[0]) - lam) / abs(lam)
                missed += error > tol
                worst = max(worst, error)
        print(f"tol={tol:g}: {len(dense)} operators x {args.seeds} seeds: {total} products, "
              f"true relative error above tol in {missed} runs, worst {worst:.1e}")


if __name__ == "__main__":
    main()
