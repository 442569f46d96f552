"""Gradient descent happens in a tiny subspace: the gradient's overlap with the top-10 Hessian eigenspace.

Gur-Ari, Roberts & Dyer (2018, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754) found that after
a short initial phase of training most of the gradient lies in the span of the top-k eigenvectors of the
Hessian, with k the number of classes, while at initialization it does not. This script measures it at small
scale with ``curvature.SharpnessMonitor``:

* scikit-learn's digits (1347 training images, 10 classes, standardized), a 64-64-64-10 ReLU MLP (PyTorch's
  default initialization, seeded), cross-entropy, plain SGD (no momentum) with step size 0.5 and batch 64;
* twice per epoch (and at initialization) the monitor measures the top-10 eigenpairs of the Hessian of the
  training loss over the whole training split (Lanczos, warm-started from the previous ten eigenvectors), and
  with them the overlap ‖Qᵀg‖²/‖g‖² of the full training gradient g (their Eq. 2), the overlap of the update
  since the previous measurement (11 SGD steps), the rotation of the eigenspace since then (principal angles),
  and the curvature along the gradient gᵀHg/‖g‖² (the one product the monitor spends beyond Lanczos).

Prints every measurement, then a table over epochs: the gradient overlap at initialization and its mean over
the measurements of each epoch, averaged over the seeds. Ends by checking the qualitative rise: for every seed the
overlap after the initial phase (its mean from epoch 2 on) is at least 0.25 above the overlap at initialization,
and at least one half. Writes
``tiny_subspace.png`` (the first seed's history) into ``--out`` when given.

Run:  python examples/tiny_subspace.py [--quick] [--lr 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from _digits import load_data  # examples/_digits.py: the script's own directory is on sys.path
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvature

K, BATCH, PER_EPOCH = 10, 64, 2
METRICS = ("lambda_max", "gradient_overlap", "update_overlap", "rotation", "gradient_curvature")


def make_model(seed: int) -> nn.Module:
    """The 64-64-64-10 ReLU MLP with PyTorch's default initialization, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()


def run(seed: int, lr: float, epochs: int, X: torch.Tensor, y: torch.Tensor) -> curvature.SharpnessMonitor:
    """SGD on the digits with the monitor measuring at initialization and ``PER_EPOCH`` times per epoch."""
    model = make_model(seed)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    every = len(loader) // PER_EPOCH  # 22 steps per epoch: a measurement every 11 steps
    monitor = curvature.SharpnessMonitor(model, loss_fn, (X, y), every=every, metrics=METRICS, top_k=K,
                                         tol=1e-4, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    steps = 0

    def measure_if_due() -> None:  # before each update and once after the last: steps 0, 11, 22, ...
        entry = monitor.step()
        if entry is not None:
            with torch.no_grad():
                entry["loss"] = loss_fn(model(X), y).item()
            entry["epoch"] = steps / len(loader)

    for _ in range(epochs):
        for xb, yb in loader:
            measure_if_due()
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
            steps += 1
    measure_if_due()
    return monitor


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed and 4 epochs instead of 3 seeds and 8 epochs")
    parser.add_argument("--lr", type=float, default=0.5, help="the SGD step size (default 0.5)")
    parser.add_argument("--out", type=Path, default=None, help="write tiny_subspace.png here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model: a second thread costs more than it saves
    X, _, y, _ = load_data(torch.float64)
    seeds, epochs = ([0], 4) if args.quick else ([0, 1, 2], 8)
    P = sum(p.numel() for p in make_model(0).parameters())
    print(f"digits: {len(X)} training images, 10 classes; MLP 64-64-64-10 ReLU (P = {P}); SGD lr {args.lr}, batch "
          f"{BATCH}, {epochs} epochs; top-{K} Hessian eigenspace of the training loss, measured {PER_EPOCH} times "
          f"per epoch; seeds {seeds}. A random direction has overlap k/P = {K / P:.4f}.")
    monitors = {}
    for seed in seeds:
        start = time.perf_counter()
        monitor = run(seed, args.lr, epochs, X, y)
        monitors[seed] = monitor
        print(f"\nseed {seed}\n{'epoch':>6s}{'loss':>8s}{'lambda_1':>10s}{'lambda_10':>10s}{'grad overlap':>14s}"
              f"{'update overlap':>16s}{'largest angle':>15s}{'eigenspace overlap':>20s}{'g^T H g/|g|^2':>15s}"
              f"{'products':>10s}")
        for e in monitor.history:
            rotation = None if e.rotation is None else math.degrees(e.rotation)
            print(f"{e['epoch']:6.1f}{e['loss']:8.3f}{e.lambda_max:10.3f}{e.top_eigenvalues[-1]:10.3f}"
                  f"{e.gradient_overlap:14.3f}{fmt(e.update_overlap, '.3f'):>16s}{fmt(rotation, '.1f'):>14s}°"
                  f"{fmt(e.eigenspace_overlap, '.3f'):>20s}{e.gradient_curvature:15.3f}{e.num_matvecs:10d}")
        print(f"seed {seed}: {monitor.total_matvecs} Hessian-vector products over {len(monitor.history)} "
              f"measurements, {time.perf_counter() - start:.1f} s")

    print(f"\ngradient overlap with the top-{K} eigenspace, mean over the measurements of each epoch "
          f"(epoch 0: at initialization)")
    print(f"{'epoch':>6s}" + "".join(f"{'seed ' + str(s):>9s}" for s in seeds) + f"{'mean':>9s}")
    table = []
    for epoch in range(epochs + 1):
        row = []
        for seed in seeds:
            values = [e.gradient_overlap for e in monitors[seed].history
                      if (e["epoch"] == 0 if epoch == 0 else epoch - 1 < e["epoch"] <= epoch)]
            row.append(statistics.mean(values))
        table.append(row)
        print(f"{epoch:6d}" + "".join(f"{v:9.3f}" for v in row) + f"{statistics.mean(row):9.3f}")

    late = [statistics.mean(column) for column in zip(*table[2:])]  # after the initial phase (epochs 2 to the end)
    initial = table[0]
    print("\ngradient overlap at initialization per seed: " + ", ".join(f"{v:.3f}" for v in initial))
    print(f"gradient overlap from epoch 2 to {epochs}, mean per seed: " + ", ".join(f"{v:.3f}" for v in late))
    rose = all(after >= before + 0.25 and after >= 0.5 for before, after in zip(initial, late))
    print(f"check: the overlap after the initial phase is at least 0.25 above its value at initialization and at "
          f"least 0.5 for every seed: {rose}")
    if args.out is not None:
        path = monitors[seeds[0]].plot(args.out / "tiny_subspace.png",
                                       title=f"digits MLP, SGD lr {args.lr}: top-{K} Hessian eigenspace")
        print(f"wrote {path}")
    if not rose:
        raise SystemExit("the gradient did not move into the top eigenspace")


if __name__ == "__main__":
    main()
