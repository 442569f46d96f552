"""SharpnessMonitor: what warm-starting Lanczos from the previous top eigenvector saves over a training run.

The edge-of-stability run of examples/edge_of_stability.py (bias-free tanh MLP 20-100-100-5, 256 samples,
full-batch gradient descent at η = 0.2 for 2000 steps, λ_max measured every 20 steps) is repeated with the
monitor warm-started (the default) and recomputing from a random start at every measurement
(``warm_start=False``), at the default tol = 1e-4 and at 1e-3, on identical trajectories (the monitor never
changes the model or the global random stream). Reported: Hessian-vector products and seconds spent measuring,
and the largest relative deviation from a tightly converged λ_max (tol = 1e-10) over the measured steps.

Run:  python benchmarks/monitor.py      # --steps 2000 --every 20
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _harness import environment_header  # noqa: E402

import curvature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from edge_of_stability import ETA, half_mse, network, problem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    environment_header()
    x, y = problem()
    model = network(seed=1)
    monitors = {}
    for tol in (1e-4, 1e-3):
        for warm in (True, False):
            name = f"tol={tol:g}, {'warm start' if warm else 'recompute'}"
            monitors[name] = curvature.SharpnessMonitor(
                model, half_mse, (x, y), every=args.every, tol=tol, warm_start=warm, reduction="mean",
                generator=torch.Generator().manual_seed(0))
    truth = []
    optimizer = torch.optim.SGD(model.parameters(), lr=ETA)
    for _ in range(args.steps):
        entries = [monitor.step() for monitor in monitors.values()]  # round-robin on the same parameters
        if entries[0] is not None:
            exact = copy.deepcopy(model).double()  # the truth in float64: float32 certifies ~1e-5 only
            H = curvature.HessianOperator(exact, half_mse, (x.double(), y.double()), reduction="mean")
            truth.append(float(curvature.eigenvalues(H, tol=1e-10, generator=torch.Generator().manual_seed(1))
                               .values[0]))
        optimizer.zero_grad()
        half_mse(model(x), y).backward()
        optimizer.step()
    print(f"\nedge-of-stability run: {args.steps} steps of gradient descent, eta={ETA}, lambda_max every {args.every} "
          f"steps ({len(truth)} measurements)")
    print(f"{'monitor':30s}{'products':>10s}{'per measurement':>17s}{'seconds':>9s}{'max rel. deviation':>20s}"
          f"{'beyond tol':>12s}")
    for name, monitor in monitors.items():
        deviations = [abs(e["lambda_max"] / t - 1) for e, t in zip(monitor.history, truth)]
        seconds = sum(e["seconds"] for e in monitor.history)
        beyond = sum(d > monitor.tol for d in deviations)
        print(f"{name:30s}{monitor.total_matvecs:10d}{monitor.total_matvecs / len(truth):17.1f}{seconds:9.2f}"
              f"{max(deviations):20.1e}{beyond:12d}")
    totals = [m.total_matvecs for m in monitors.values()]
    print(f"recomputing costs {totals[1] / totals[0]:.1f}x the products of the warm-started monitor at tol=1e-4 "
          f"(the default) and {totals[3] / totals[2]:.1f}x at tol=1e-3")


if __name__ == "__main__":
    main()
