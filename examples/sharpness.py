"""How sharp is a trained classifier? One call to ``curvature.sharpness`` on real data (scikit-learn's digits).

Trains a 64-32-10 tanh MLP on the 8x8 digit images with minibatch SGD, then measures the Hessian of the
training loss over a ``DataLoader`` (batches of 256, the last one uneven): λ_max and the top 5 eigenvalues
(Lanczos), λ_min, the trace (Hutchinson), the Frobenius norm and the spectral density (stochastic Lanczos
quadrature). Prints the report, writes ``density.png`` and ``report.json`` into ``--out``, and checks the
numbers against independent computations: λ_max against ARPACK (``scipy.sparse.linalg.eigsh``) to 1e-8,
the trace estimate against the exact trace (``P`` products) within 3 of its standard errors, and the
density's first moment against its own trace estimate. With ``blocks=True`` the report adds a per-layer table:
λ_max and the trace of each layer's diagonal Hessian block (the Hessian in that layer's parameters alone),
checked against ARPACK on the layer's own operator and against the layer's exact trace.

Run:  python examples/sharpness.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _digits import load_data  # examples/_digits.py: the script's own directory is on sys.path
from scipy.sparse.linalg import eigsh
from torch.utils.data import DataLoader, TensorDataset

import curvature


def train(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Minibatch SGD with momentum, batch 64, a fixed shuffling seed."""
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train 5 epochs instead of 30")
    parser.add_argument("--out", type=Path, default=Path("sharpness-out"), help="directory for the PNG and JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: a second thread costs more than it saves

    X, X_test, y, y_test = load_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    loss_fn = torch.nn.CrossEntropyLoss()
    epochs = 5 if args.quick else 30
    start = time.perf_counter()
    train(model, X, y, epochs)
    with torch.no_grad():
        train_loss = loss_fn(model(X), y).item()
        test_acc = (model(X_test).argmax(1) == y_test).double().mean().item()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"digits: {len(X)} train / {len(X_test)} test samples; MLP 64-32-10 tanh, {num_params} parameters")
    print(f"SGD, {epochs} epochs in {time.perf_counter() - start:.1f} s: train loss {train_loss:.4f}, "
          f"test accuracy {test_acc:.3f}\n")

    data = DataLoader(TensorDataset(X, y), batch_size=256)  # 1347 samples: 5 batches of 256 and one of 67
    report = curvature.sharpness(
        model, loss_fn, data, metrics=curvature.METRICS, k=5, tol=1e-6, num_matvecs=100,
        density_probes=4, density_steps=60, generator=torch.Generator().manual_seed(0), blocks=True,
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    report.to_json(args.out / "report.json")
    report.density.plot(args.out / "density.png", title=f"Hessian spectrum, digits MLP ({num_params} params)")
    print(f"\nwrote {args.out / 'report.json'} and {args.out / 'density.png'}")

    print("\nchecks")
    H = curvature.HessianOperator(model, loss_fn, data)
    v0 = np.random.default_rng(0).standard_normal(num_params)
    arpack = float(eigsh(H.to_scipy(), k=1, which="LA", v0=v0, tol=1e-12, return_eigenvectors=False)[0])
    lam_err = abs(report.lambda_max - arpack) / abs(arpack)
    print(f"  lambda_max: Lanczos {report.lambda_max:.10f} in {report.num_matvecs['eigenvalues']} products, "
          f"ARPACK {arpack:.10f} in {H.num_matvecs} (relative difference {lam_err:.1e})")
    exact = curvature.trace(H, method="exact")
    z = (report.trace.value - exact.value) / report.trace.std_error
    print(f"  trace: Hutchinson {report.trace.value:.6f} ± {report.trace.std_error:.2g} "
          f"({report.trace.num_matvecs} products), exact {exact.value:.6f} ({exact.num_matvecs} products): "
          f"{z:+.2f} standard errors")
    slq = report.density.trace_estimate()
    moment_gap = abs(slq.value - num_params * report.density.moment(1))
    print(f"  density: weights sum to {float(report.density.weights.sum()):.15f}; P x first moment "
          f"{num_params * report.density.moment(1):.6f} = its trace estimate {slq.value:.6f} ± {slq.std_error:.2g}")
    failed = lam_err > 1e-8 or abs(z) > 3 or moment_gap > 1e-8 * abs(slq.value) or not math.isfinite(slq.std_error)
    layer_traces = 0.0
    for block in report.blocks:  # each layer's Hessian on its own: HessianOperator(params=...)
        H_b = curvature.HessianOperator(model, loss_fn, data, params=block.params)
        v0 = np.random.default_rng(0).standard_normal(block.num_params)
        arpack = float(eigsh(H_b.to_scipy(), k=1, which="LA", v0=v0, tol=1e-12, return_eigenvectors=False)[0])
        exact_b = curvature.trace(H_b, method="exact")
        layer_traces += exact_b.value
        z_b = (block.trace.value - exact_b.value) / block.trace.std_error
        print(f"  layer {block.name!r} ({block.num_params} parameters): lambda_max {block.lambda_max:.10f}, ARPACK "
              f"{arpack:.10f}; trace {block.trace.value:.6f} ± {block.trace.std_error:.2g}, exact "
              f"{exact_b.value:.6f}: {z_b:+.2f} standard errors")
        failed |= abs(block.lambda_max - arpack) > 1e-6 * abs(arpack) or abs(z_b) > 3  # tol=1e-6
    print(f"  the layers' exact traces add up to {layer_traces:.10f}, the exact trace is {exact.value:.10f}")
    if failed or abs(layer_traces - exact.value) > 1e-10 * abs(exact.value):
        raise SystemExit("a check failed")


if __name__ == "__main__":
    main()
