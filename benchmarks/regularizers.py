"""Sharpness regularizers: the cost of one training step of each, relative to a plain SGD step.

Karakida et al. (2023) argue that finite-difference gradient regularization is cheaper than double backward
(about 6L against 9L matrix products for an L-layer network). This script measures one full training step
(forward, gradients, optimizer update) of:

* SGD (one forward and backward: the unit);
* ``curvature.optim.SAM`` (two forward-backward passes);
* ``curvature.regularizers.GradientRegularization`` with ``method="forward"`` (two), ``"central"``
  (three) and ``"exact"`` (double backward);
* SGD on L + β·tr(H) with ``hessian_trace_penalty`` (one Hutchinson probe: a gradient with its graph, a
  double-backward product, and the backward through both).

Problems (float32, batch 128, CrossEntropyLoss): the 64-32-10 tanh MLP of the examples on the digits, a
wider 784-512-512-10 ReLU MLP, and a small CNN (two 3x3 conv layers of 32 channels, 28x28 inputs). Steps are
timed round-robin over the methods, medians of ``--reps`` repetitions after warm-up.

Run:  python benchmarks/regularizers.py      # --reps 30 --threads 1 --device cpu (or cuda)
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from _harness import Row, environment_header, round_robin  # noqa: E402
from torch import nn  # noqa: E402

from curvature.optim import SAM  # noqa: E402
from curvature.regularizers import GradientRegularization, hessian_trace_penalty  # noqa: E402


def problems() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = {
        "mlp 64-32-10": (nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)),
                         torch.randn(128, 64, generator=g)),
        "mlp 784-512-512-10": (nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                             nn.Linear(512, 10)), torch.randn(128, 784, generator=g)),
        "cnn 2x conv32": (nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                        nn.Linear(32 * 7 * 7, 10)), torch.randn(128, 1, 28, 28, generator=g)),
    }
    return {name: (model, x, torch.randint(0, 10, (128,), generator=g)) for name, (model, x) in out.items()}


def steppers(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    loss_fn = nn.CrossEntropyLoss()
    closure = lambda: loss_fn(model(x), y)  # noqa: E731
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-4)
    grs = {m: GradientRegularization(model.parameters(), torch.optim.SGD, gamma=0.1, method=m, lr=1e-4)
           for m in ("forward", "central", "exact")}
    probe = torch.Generator().manual_seed(0)

    def plain() -> None:
        sgd.zero_grad()
        closure().backward()
        sgd.step()

    def trace_penalty() -> None:
        sgd.zero_grad()
        loss = closure()
        (loss + 1e-3 * hessian_trace_penalty(loss, model.parameters(), generator=probe)).backward()
        sgd.step()

    return {
        "SGD": plain,
        "SAM": lambda: sam.step(closure),
        "grad-norm forward": lambda: grs["forward"].step(closure),
        "grad-norm central": lambda: grs["central"].step(closure),
        "grad-norm exact (double backward)": lambda: grs["exact"].step(closure),
        "trace penalty (1 probe)": trace_penalty,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    environment_header(f"reps {args.reps}", device=device)
    for name, (model, x, y) in problems().items():
        model, x, y = model.to(device), x.to(device), y.to(device)
        rows = [Row(method, call) for method, call in steppers(model, x, y).items()]
        round_robin(rows, args.reps, warmup=1, device=device)
        unit = rows[0].median  # SGD
        params = sum(p.numel() for p in model.parameters())
        print(f"\n{name} ({params} parameters, batch {len(y)}): median step time, and in SGD steps")
        for row in rows:
            print(f"  {row.label:36s}{1e3 * row.median:9.3f} ms{row.median / unit:8.2f}x")


if __name__ == "__main__":
    main()
