"""How close are the usual curvature approximations to the exact operators? ``curvature.compare`` on the digits.

Trains a 64-32-10 tanh MLP (2410 parameters, float64) on scikit-learn's digits (1347 training images) with Adam,
then compares over the training set, with ``curvature.compare(approximation, reference, k=10, ...)``:

* K-FAC and EK-FAC of the GGN (Martens & Grosse 2015; George et al. 2018) against the GGN;
* the Monte-Carlo Fisher with one sampled label per image and the empirical Fisher (Kunstner, Balles & Hennig
  2019) against the GGN, which for cross-entropy is the exact Fisher;
* the GGN against the Hessian.

Each row: the relative Frobenius distance ``‖A − B‖_F / ‖B‖_F`` and the trace ratio with their standard errors
(the same probes for every row: one seed), the ratio of the largest eigenvalues, the overlap of the top-10
eigenspaces (1: the same space; 10/2410 = 0.004 for random ones) and their largest principal angle, and the
products spent on each operator. ``--exact`` adds the exact distance and trace ratio (``num_matvecs ≥ P``: the
2410 identity columns) to check the estimates; ``--quick`` trains less and uses fewer probes.

Run:  python examples/compare_approximations.py [--quick] [--exact]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _digits import load_data  # examples/_digits.py: the script's own directory is on sys.path
from torch import nn

import curvature

SEED, K = 0, 10


def train(X: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """Adam (lr 1e-2) on minibatches of 64, the order drawn from a seeded generator."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=order).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs, 30 probes, tol 1e-3 (a smoke test)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of Adam before measuring (default 20)")
    parser.add_argument("--exact", action="store_true", help="also the exact distance and trace ratio (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model: a second thread costs more than it saves

    X, X_test, y, y_test = load_data(torch.float64)
    epochs, probes, tol = (5, 30, 1e-3) if args.quick else (args.epochs, 100, 1e-4)
    model = train(X, y, epochs)
    loss_fn, data = nn.CrossEntropyLoss(), (X, y)
    with torch.no_grad():
        loss, accuracy = loss_fn(model(X), y).item(), (model(X_test).argmax(1) == y_test).double().mean().item()
    P = sum(p.numel() for p in model.parameters())
    print(f"digits MLP 64-32-10 tanh, {P} parameters, float64; Adam, {epochs} epochs: training loss {loss:.4f}, "
          f"test accuracy {accuracy:.3f}")
    print(f"compare(A, B, k={K}, num_matvecs={probes}, tol={tol:g}, generator=seed {SEED}) over the "
          f"{len(X)} training images\n")

    ggn = curvature.GGNOperator(model, loss_fn, data)
    pairs = {
        ("K-FAC", "GGN"): (curvature.KFACOperator(model, loss_fn, data), ggn),
        ("EK-FAC", "GGN"): (curvature.EKFACOperator(model, loss_fn, data), ggn),
        ("MC Fisher (1 sample)", "GGN"): (curvature.FisherOperator(
            model, loss_fn, data, mc_samples=1, generator=torch.Generator().manual_seed(SEED)), ggn),
        ("empirical Fisher", "GGN"): (curvature.EmpiricalFisherOperator(model, loss_fn, data), ggn),
        ("GGN", "Hessian"): (ggn, curvature.HessianOperator(model, loss_fn, data)),
    }
    head = (f"{'A':22s}{'B':9s}{'‖A−B‖/‖B‖':>17s}{'tr A / tr B':>17s}{'λmax ratio':>12s}{'overlap':>9s}"
            f"{'max angle':>11s}{'products A, B':>15s}{'time':>8s}")
    print(head + ("" if not args.exact else f"{'exact dist.':>13s}{'exact tr.':>11s}"))
    print("-" * (len(head) + (24 if args.exact else 0)))
    results = {}
    for (name_a, name_b), (A, B) in pairs.items():
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(SEED)  # the same probes and start vector for every pair
        c = results[name_a] = curvature.compare(A, B, k=K, num_matvecs=probes, tol=tol, generator=generator)
        seconds = time.perf_counter() - start
        line = (f"{name_a:22s}{name_b:9s}{c.distance:10.4f} ±{c.distance_std_error:6.4f}"
                f"{c.trace_ratio:10.4f} ±{c.trace_ratio_std_error:6.4f}{c.lambda_max_ratio:12.4f}{c.overlap:9.3f}"
                f"{math.degrees(float(c.angles.max())):10.1f}°{c.num_matvecs_a:8d},{c.num_matvecs_b:6d}"
                f"{seconds:7.1f}s")
        if args.exact:
            e = curvature.compare(A, B, k=1, num_matvecs=P, tol=1e-2, generator=torch.Generator().manual_seed(SEED))
            line += f"{e.distance:13.4f}{e.trace_ratio:11.4f}"
        print(line)
    print(f"\noverlap: ‖U_Aᵀ U_B‖_F² / {K} of the top-{K} eigenvectors (1: one space; a random pair: {K / P:.4f}); "
          f"max angle: the largest principal angle between them")

    # What held at every point measured (5 and 20 epochs; docs/subspaces.md), by margins of many standard errors.
    checks = {
        "the GGN's top-10 eigenspace is nearly the Hessian's (overlap > 0.9)": results["GGN"].overlap > 0.9,
        "the empirical Fisher's trace is below half the GGN's": results["empirical Fisher"].trace_ratio < 0.5,
        "K-FAC is more than 50% of the GGN's norm away from it": results["K-FAC"].distance > 0.5,
    }
    for text, ok in checks.items():
        print(f"check: {text}: {ok}")
    if not all(checks.values()):
        raise SystemExit("a check failed")


if __name__ == "__main__":
    main()
