"""The four curvature operators on a small MLP trained on real data (scikit-learn's digits).

Trains a 64-32-10 tanh MLP on the 8x8 digit images with full-batch Adam, then builds a Hessian, a GGN,
an exact and a Monte-Carlo Fisher and an empirical Fisher over the training set, and reports each
operator's top eigenvalue (``scipy.sparse.linalg.eigsh`` on ``op.to_scipy()``), the products it took and
the time. Check lines compare the Hessian over a ``DataLoader`` (with an uneven last batch) against the
single-batch one, and the top eigenvalue against the dense reference ``curvature.reference``.

Run:  python examples/operators_digits.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _digits import load_data  # examples/_digits.py: the script's own directory is on sys.path
from scipy.sparse.linalg import eigsh
from torch.utils.data import DataLoader, TensorDataset

import curvature
from curvature.reference import hessian_matrix


def top_eigenvalue(op: curvature.LinearOperator) -> float:
    """Largest (algebraic) eigenvalue by ARPACK, from a fixed start vector so reruns agree."""
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])
    return float(eigsh(op.to_scipy(), k=1, which="LA", v0=v0, return_eigenvectors=False)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train 60 steps instead of 300")
    args = parser.parse_args()
    # The model is tiny: waking a second thread per op costs more than it saves.
    torch.set_num_threads(1)

    X, X_test, y, y_test = load_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 60 if args.quick else 300
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(X), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        train_loss = loss_fn(model(X), y).item()
        test_acc = (model(X_test).argmax(1) == y_test).double().mean().item()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"digits: {len(X)} train / {len(X_test)} test samples, MLP 64-32-10 tanh, {num_params} parameters")
    print(f"Adam, {steps} full-batch steps in {time.perf_counter() - start:.2f} s: "
          f"train loss {train_loss:.4f}, test accuracy {test_acc:.3f}")

    full = (X, y)
    # A plain DataLoader draws a seed from the global RNG each time it is iterated; the operators restore
    # the RNG afterwards, so the check at the end holds for it too.
    loader = DataLoader(TensorDataset(X, y), batch_size=256, shuffle=True)
    sizes = [len(b[1]) for b in loader]
    loader_label = f"loader {len(sizes)}x (last {sizes[-1]})"
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()

    rows = [
        ("HessianOperator", "full batch", lambda: curvature.HessianOperator(model, loss_fn, full)),
        ("HessianOperator", loader_label, lambda: curvature.HessianOperator(model, loss_fn, loader)),
        ("GGNOperator", "full batch", lambda: curvature.GGNOperator(model, loss_fn, full)),
        ("FisherOperator exact", "full batch", lambda: curvature.FisherOperator(model, loss_fn, full)),
        *[
            (f"FisherOperator mc_samples={m}", "full batch",
             lambda m=m: curvature.FisherOperator(model, loss_fn, full, mc_samples=m,
                                                  generator=torch.Generator().manual_seed(0)))
            for m in (1, 10)
        ],
        ("EmpiricalFisherOperator", loader_label, lambda: curvature.EmpiricalFisherOperator(model, loss_fn, loader)),
    ]
    print(f"\n{'operator':<30} {'data':<22} {'top eigenvalue':>15} {'products':>9} {'seconds':>8}")
    ops, tops = {}, {}
    for name, data_label, build in rows:
        start = time.perf_counter()
        op = build()
        value = top_eigenvalue(op)
        seconds = time.perf_counter() - start
        ops[name, data_label], tops[name, data_label] = op, value
        print(f"{name:<30} {data_label:<22} {value:>15.6f} {op.num_matvecs:>9d} {seconds:>8.2f}")

    print("\nchecks")
    H_full, H_loader = ops["HessianOperator", "full batch"], ops["HessianOperator", loader_label]
    v = torch.randn(num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Hv = H_full @ v
    diff = (H_loader @ v - Hv).abs().max().item()
    print(f"  Hessian product, loader vs one full batch: max abs diff {diff:.2e} (max |Hv| {Hv.abs().max():.2e})")

    def mc_fisher_product(seed: int) -> torch.Tensor:
        op = curvature.FisherOperator(model, loss_fn, full, mc_samples=10,
                                      generator=torch.Generator().manual_seed(seed))
        return op @ v

    same = (mc_fisher_product(0) - mc_fisher_product(0)).abs().max().item()
    other = (mc_fisher_product(0) - mc_fisher_product(1)).abs().max().item()
    print(f"  MC Fisher product, same generator seed twice: max abs diff {same:.2e}; seeds 0 vs 1: {other:.2e}")

    # Dense float64 reference (one reverse pass per parameter: a few seconds, ~1 GB here), for all
    # parameters and for the output layer alone (the params= restriction).
    last = ["2.weight", "2.bias"]
    checks = [
        (f"all {num_params} params (table)", None, tops["HessianOperator", "full batch"]),
        (f"output layer only ({sum(model.get_parameter(n).numel() for n in last)} params)", last,
         top_eigenvalue(curvature.HessianOperator(model, loss_fn, full, params=last))),
    ]
    worst = 0.0
    for label, params, ours in checks:
        start = time.perf_counter()
        dense = torch.linalg.eigvalsh(hessian_matrix(model, loss_fn, full, params=params))[-1].item()
        print(f"  top Hessian eigenvalue, {label}: eigsh {ours:.10f}, dense reference {dense:.10f} "
              f"(abs diff {abs(ours - dense):.1e}; reference took {time.perf_counter() - start:.1f} s)")
        worst = max(worst, abs(ours - dense) / abs(dense))

    unchanged = {
        "parameters": all(torch.equal(state_before[k], t) for k, t in model.state_dict().items()),
        ".grad": all(p.grad is None for p in model.parameters()),
        "train mode": model.training,
        "global RNG": torch.equal(rng_before, torch.get_rng_state()),
    }
    print("  model unchanged after all of the above: " + ", ".join(f"{k} {v}" for k, v in unchanged.items()))
    if not all(unchanged.values()) or diff > 1e-10 * Hv.abs().max().item() or same != 0 or worst > 1e-8:
        raise SystemExit("a check failed")


if __name__ == "__main__":
    main()
