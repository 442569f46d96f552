"""Per-sample gradients and exact diagonals on the digits: finding mislabeled images, and OBD without noise.

Trains a 64-32-10 tanh MLP (2410 parameters, float64) on scikit-learn's digits (1347 training images) after
flipping 10% of the training labels to a wrong class, then:

1. **Per-sample gradient norms** (``curvature.gradient_norms``; GraNd, Paul et al. 2021): after training, the
   flipped images are the ones the model cannot fit, and their gradients are the largest. Prints the fraction of
   the flipped images among the 10% and 20% largest norms (10% and 20% expected by chance), and checks that the
   per-sample gradients, divided by the stream's normalizer, sum to the full-batch gradient.
2. **The exact GGN diagonal** (``GGNOperator(...).diagonal()``: one vectorized pullback per sample and class, no
   products) against Hutchinson's estimate with 100 GGN products: relative error and seconds of each; the exact
   diagonal of 100 images against the dense float64 reference (``curvature.reference.ggn``).
3. **Per-sample GGN diagonals** (``curvature.per_sample_diagonals``): which images carry the curvature.
4. **Optimal Brain Damage with the exact diagonal** (``sensitivity(..., "obd", diagonal="exact")``) against the
   Hutchinson Hessian diagonal: test accuracy after pruning 50% of the hidden layer's weights by each.

Run:  python examples/per_sample_digits.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _digits import load_data  # examples/_digits.py: the script's own directory is on sys.path
from torch import nn

import curvature
from curvature.pruning import prune, sensitivity


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (for the tests)")
    args = parser.parse_args()
    x, x_test, y, y_test = load_data(torch.float64)
    gen = torch.Generator().manual_seed(0)
    flipped = torch.randperm(len(y), generator=gen)[: len(y) // 10]
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=gen)) % 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    train(model, x, noisy, 15 if args.quick else 40)
    loss_fn = nn.CrossEntropyLoss()
    data = (x, noisy)
    print(f"digits MLP 64-32-10, P = {sum(p.numel() for p in model.parameters())}, N = {len(y)}, "
          f"{len(flipped)} labels flipped; train accuracy on the noisy labels {accuracy(model, x, noisy):.3f}, "
          f"test accuracy {accuracy(model, x_test, y_test):.3f}")

    # 1. per-sample gradient norms find the flipped labels
    start = time.perf_counter()
    stream = curvature.per_sample_gradients(model, loss_fn, data)
    norms = stream.norms()
    seconds = time.perf_counter() - start
    is_flipped = torch.zeros(len(y), dtype=torch.bool)
    is_flipped[flipped] = True
    order = norms.argsort(descending=True)
    print(f"\n1. per-sample gradient norms ({seconds:.2f} s for {len(y)} gradients)")
    for share in (0.1, 0.2):
        top = order[: int(share * len(y))]
        found = int(is_flipped[top].sum())
        print(f"   flipped images among the {share:.0%} largest norms: {found} of {len(flipped)} "
              f"({found / len(flipped):.0%}; {share:.0%} by chance)")
    model.zero_grad()
    loss_fn(model(x), noisy).backward()
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    mean = stream.mean()
    print(f"   sum of per-sample gradients / normalizer ({stream.normalizer:.0f}) against the full gradient: max "
          f"difference {float((mean - full).abs().max()):.1e}")

    # 2. the exact GGN diagonal against Hutchinson and the dense reference
    G = curvature.GGNOperator(model, loss_fn, data)
    start = time.perf_counter()
    exact = G.diagonal()
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    hutch = curvature.diagonal(G, method="hutchinson", num_matvecs=100, generator=torch.Generator().manual_seed(0))
    t_hutch = time.perf_counter() - start
    sub = (x[:100], noisy[:100])  # the dense float64 reference, on 100 images (a P x P matrix per image)
    dense = curvature.reference.ggn(model, loss_fn, sub).diagonal()
    on_sub = curvature.GGNOperator(model, loss_fn, sub).diagonal()
    print("\n2. the GGN diagonal")
    print(f"   exact from the structure: {t_exact:.2f} s, 0 products; on 100 images against the dense float64 "
          f"reference: relative error {float((on_sub - dense).norm() / dense.norm()):.1e}")
    print(f"   Hutchinson, 100 products: {t_hutch:.2f} s, relative error against the exact diagonal "
          f"{float((hutch.value - exact).norm() / exact.norm()):.1e}")

    # 3. per-sample diagonals: whose curvature is it?
    per_sample = curvature.per_sample_diagonals(G).map(lambda d: d.sum(1))  # each image's share of the GGN trace
    share = float(per_sample[flipped].sum() / per_sample.sum())
    print(f"\n3. per-sample GGN traces: the flipped 10% of the images carry {share:.1%} of the trace")

    # 4. OBD with the exact GGN diagonal against the Hutchinson Hessian diagonal
    print("\n4. Optimal Brain Damage, 50% of the hidden layer's weights pruned (test accuracy)")
    print(f"   unpruned: {accuracy(model, x_test, y_test):.3f}")
    hutchinson = {"num_matvecs": 20, "generator": torch.Generator().manual_seed(0)}
    for label, kwargs in (("exact GGN diagonal (no products)", {"diagonal": "exact"}),
                          ("Hessian diagonal, Hutchinson 20 products", hutchinson)):
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        scores = sensitivity(pruned, loss_fn, data, "obd", "weight", layers=["0"], **kwargs)
        seconds = time.perf_counter() - start
        prune(pruned, scores, amount=0.5)
        print(f"   {label}: {accuracy(pruned, x_test, y_test):.3f} ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
