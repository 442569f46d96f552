"""Curvature-aware optimizers: curvature.optim against scipy's Newton-type solvers, L-BFGS, GD and Adam.

One run, float64, full batch, the same closures for everyone:

(a) Logistic regression on scikit-learn's digits (1797 images, 64 standardized features, 10 classes,
    penalty ½·1e-2·‖W‖², zero start; 650 parameters), the convex problem of tests/test_optim_problems.py.
    Target: ‖∇f‖ ≤ 1e-8. Reported per method: steps (outer iterations), loss evaluations, gradient
    evaluations, Hessian-vector products, seconds (median over repetitions, timed round-robin), the final
    gradient norm and the largest parameter error against the optimum polished to ‖∇f‖ ≈ 1e-16 (biases
    centered: the loss ignores a common shift).
(b) The 64-32-10 tanh MLP of examples/second_order_training.py (2410 parameters, 1347 training images).
    Target: training loss ≤ 1e-5 (the model can fit the data exactly; there is no unique minimizer).
(c) What the optimizers' Hessian products cost on (a) and (b): one gradient (forward and backward), the
    gradient with its graph (``create_graph=True``, once per step), and one product through that graph,
    in medians of 200 calls, round-robin.

Methods: ``RegularizedNewton`` and ``HessianFree`` (exact Hessian; on (b) also on the GGN), and
``SaddleFreeNewton`` on (b); scipy's ``trust-ncg`` and ``Newton-CG`` (Hessian-vector products by double
backward through the same closure), scipy's ``L-BFGS-B``, ``torch.optim.LBFGS`` (strong Wolfe line search,
history 50, 20 iterations per ``step``, the usual setting: it checks the target every 20 iterations; with
one iteration per ``step`` it stalled on (a)), and full-batch GD and Adam at the best step size of a grid (measured
once; constants below). Every method checks the target after each iteration (scipy's through its callback,
GD and Adam every 10 steps) and stops there; the check's own gradient is timed but not counted.
Columns: ``losses`` counts loss evaluations (for curvature's optimizers: closure calls, including those they
differentiate; ``grads`` then shows ``-``), ``grads`` separate gradient evaluations, ``HVPs`` curvature-vector
products.

Run:  python benchmarks/optimizers.py      # --reps 5 --threads 1
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
import torch  # noqa: E402
from _harness import Row, environment_header, round_robin  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402
from curvature.optim import HessianFree, RegularizedNewton, SaddleFreeNewton  # noqa: E402

F64 = torch.float64
PENALTY = 1e-2
GD_LR = {"logistic": 5.5, "mlp": 10.0}  # best of a grid (logistic: 5.7 diverges; mlp: with momentum 0.9)
ADAM_LR = {"logistic": 0.1, "mlp": 0.1}
FIRST_ORDER_STEPS = 5000


@dataclass
class Outcome:
    steps: int
    losses: int
    grads: int
    hvps: int
    reached: bool
    grad_norm: float
    loss: float
    theta: torch.Tensor


class Counted:
    """A problem's closure with counters, and its flat gradient and Hessian-vector products for scipy."""

    def __init__(self, model: nn.Module, loss: Callable[[], torch.Tensor]) -> None:
        self.model, self.loss = model, loss
        self.params = list(model.parameters())
        self.losses = self.grads = self.hvps = 0

    def closure(self) -> torch.Tensor:
        self.losses += 1
        return self.loss()

    def theta(self) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(self.params).detach().clone()

    def set(self, theta: np.ndarray) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.as_tensor(theta, dtype=F64), self.params)

    def grad(self) -> torch.Tensor:
        self.grads += 1
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(self.loss(), self.params)])

    def grad_norm(self) -> float:
        grads = torch.autograd.grad(self.loss(), self.params)  # not counted: the referee's check
        return float(torch.cat([g.reshape(-1) for g in grads]).norm())

    # scipy's interface (NumPy in and out)
    def f(self, theta: np.ndarray) -> float:
        self.set(theta)
        self.losses += 1
        with torch.no_grad():
            return float(self.loss())

    def jac(self, theta: np.ndarray) -> np.ndarray:
        self.set(theta)
        return self.grad().numpy()

    def hessp(self, theta: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.set(theta)
        self.hvps += 1
        grads = torch.autograd.grad(self.loss(), self.params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        hv = torch.autograd.grad(flat, self.params, torch.as_tensor(v, dtype=F64))
        return torch.cat([h.reshape(-1) for h in hv]).numpy()


# -- problems ------------------------------------------------------------------------------------------------


def logistic() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    X, y = load_digits(return_X_y=True)
    std = X.std(0)
    std[std == 0] = 1.0
    X, y = torch.tensor((X - X.mean(0)) / std, dtype=F64), torch.tensor(y)
    model = nn.Linear(64, 10).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model, lambda: nn.functional.cross_entropy(model(X), y) + 0.5 * PENALTY * model.weight.pow(2).sum()


def mlp() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from _digits import load_data

    X, _, y, _ = load_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    return model, lambda: nn.functional.cross_entropy(model(X), y)


PROBLEMS = {"logistic": logistic, "mlp": mlp}


def reached(problem: str, counted: Counted) -> bool:
    if problem == "logistic":
        return counted.grad_norm() <= 1e-8
    with torch.no_grad():
        return float(counted.loss()) <= 1e-5


# -- methods ---------------------------------------------------------------------------------------------------


def ggn_factory(model: nn.Module) -> Callable:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from _digits import load_data

    X, _, y, _ = load_data()
    return lambda params: curvature.GGNOperator(model, nn.CrossEntropyLoss(), (X, y), params=params)


def hf_ggn(problem: str, counted: Counted, max_steps: int) -> tuple[int, int]:
    optimizer = HessianFree(counted.params, curvature=ggn_factory(counted.model))
    return drive(problem, counted, optimizer, max_steps)


def rn_ggn(problem: str, counted: Counted, max_steps: int) -> tuple[int, int]:
    optimizer = RegularizedNewton(counted.params, curvature=ggn_factory(counted.model))
    return drive(problem, counted, optimizer, max_steps)


def drive(problem: str, counted: Counted, optimizer: torch.optim.Optimizer, max_steps: int) -> tuple[int, int]:
    steps = 0
    while not reached(problem, counted) and steps < max_steps:
        optimizer.step(counted.closure)
        steps += 1
    return steps, sum(int(s.get("num_matvecs", 0)) for s in optimizer.state.values())


def ours(cls: type, **options: object) -> Callable:
    return lambda problem, counted, max_steps: drive(problem, counted, cls(counted.params, **options), max_steps)


def scipy_method(method: str) -> Callable:
    def run(problem: str, counted: Counted, max_steps: int) -> tuple[int, int]:
        hessp = counted.hessp if method in ("trust-ncg", "Newton-CG") else None
        options = {"trust-ncg": {"gtol": 1e-9, "maxiter": max_steps},
                   "Newton-CG": {"xtol": 1e-16, "maxiter": max_steps},
                   "L-BFGS-B": {"gtol": 1e-10, "ftol": 0.0, "maxcor": 50, "maxiter": 20 * max_steps}}[method]
        iterations = 0

        def stop_at_target(theta: np.ndarray) -> None:  # the same stopping rule as everyone's
            nonlocal iterations
            iterations += 1
            counted.set(theta)
            if reached(problem, counted):
                raise StopIteration

        result = scipy.optimize.minimize(counted.f, counted.theta().numpy(), jac=counted.jac, hessp=hessp,
                                         method=method, options=options, callback=stop_at_target)
        counted.set(result.x)
        return iterations, counted.hvps
    return run


def torch_lbfgs(problem: str, counted: Counted, max_steps: int) -> tuple[int, int]:
    optimizer = torch.optim.LBFGS(counted.params, lr=1, max_iter=20, history_size=50, tolerance_grad=1e-12,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = counted.closure()
        loss.backward()
        counted.grads += 1
        return loss

    steps = 0
    while not reached(problem, counted) and steps < max_steps:
        optimizer.step(closure)
        steps += 1
    for p in counted.params:
        p.grad = None
    return int(optimizer.state[optimizer._params[0]]["n_iter"]), 0


def first_order(kind: str) -> Callable:
    def run(problem: str, counted: Counted, max_steps: int) -> tuple[int, int]:
        lr = (GD_LR if kind == "gd" else ADAM_LR)[problem]
        momentum = 0.9 if problem == "mlp" else 0.0
        optimizer = (torch.optim.SGD(counted.params, lr=lr, momentum=momentum) if kind == "gd"
                     else torch.optim.Adam(counted.params, lr=lr))
        steps = 0
        while steps < FIRST_ORDER_STEPS and not (steps % 10 == 0 and reached(problem, counted)):
            optimizer.zero_grad()
            counted.closure().backward()
            counted.grads += 1
            optimizer.step()
            steps += 1
        for p in counted.params:
            p.grad = None
        return steps, 0
    return run


METHODS = {
    "logistic": {
        "RegularizedNewton (H)": ours(RegularizedNewton),
        "HessianFree (H)": ours(HessianFree),
        "scipy trust-ncg": scipy_method("trust-ncg"),
        "scipy Newton-CG": scipy_method("Newton-CG"),
        "scipy L-BFGS-B": scipy_method("L-BFGS-B"),
        "torch LBFGS": torch_lbfgs,
        "GD (lr 5.5)": first_order("gd"),
        "Adam (lr 0.1)": first_order("adam"),
    },
    "mlp": {
        "RegularizedNewton (H)": ours(RegularizedNewton),
        "RegularizedNewton (GGN)": rn_ggn,
        "HessianFree (H)": ours(HessianFree),
        "HessianFree (GGN)": hf_ggn,
        "SaddleFreeNewton (H)": ours(SaddleFreeNewton),
        "scipy trust-ncg": scipy_method("trust-ncg"),
        "scipy L-BFGS-B": scipy_method("L-BFGS-B"),
        "torch LBFGS": torch_lbfgs,
        "GD+momentum (lr 10)": first_order("gd"),
        "Adam (lr 0.1)": first_order("adam"),
    },
}


def method_row(problem: str, name: str, method: Callable, max_steps: int) -> Row:
    """A timed run of ``method`` from the start, on a problem built (untimed) before each run."""
    def prepare(_: int) -> tuple[Counted]:
        return (Counted(*PROBLEMS[problem]()),)

    def run(counted: Counted) -> tuple[Counted, int, int]:
        return (counted, *method(problem, counted, max_steps))

    return Row(name, run, prepare, keep=True)


def outcome(problem: str, counted: Counted, steps: int, hvps: int) -> Outcome:
    """Where a run ended, checked after its timing."""
    ok = reached(problem, counted)
    with torch.no_grad():
        value = float(counted.loss())
    # the closure counts loss calls of our optimizers; gradients of ours are one per differentiated call
    return Outcome(steps, counted.losses, counted.grads, hvps, ok, counted.grad_norm(), value, counted.theta())


def optimum() -> torch.Tensor:
    """The logistic regression's minimizer to ‖∇f‖ ≈ 1e-16: RegularizedNewton run to the end, then checked."""
    model, loss = logistic()
    counted = Counted(model, loss)
    optimizer = RegularizedNewton(counted.params, cg_tol=1e-14)
    for _ in range(40):
        if counted.grad_norm() < 1e-15:
            break
        optimizer.step(loss)
    return counted.theta()


def parameter_error(theta: torch.Tensor, star: torch.Tensor) -> float:
    W, b = theta[:640], theta[640:]
    W_star, b_star = star[:640], star[640:]
    return max(float((W - W_star).abs().max()), float(((b - b.mean()) - (b_star - b_star.mean())).abs().max()))


def product_costs(problem: str, reps: int = 200) -> None:
    from curvature.optim._base import evaluate

    model, loss = PROBLEMS[problem]()
    params = list(model.parameters())
    point = evaluate(loss, params, order=2)
    v = torch.randn(point.grad.numel(), dtype=F64, generator=torch.Generator().manual_seed(0))

    def gradient() -> None:
        torch.autograd.grad(loss(), params)

    def graph() -> None:
        torch.autograd.grad(loss(), params, create_graph=True)

    def product() -> None:
        point.hessian @ v

    rows = [Row("gradient", gradient), Row("gradient with graph", graph), Row("Hessian product (kept graph)", product)]
    round_robin(rows, reps)
    base = rows[0].median
    print(f"\n(c) {problem}: " + ", ".join(
        f"{row.label} {1e3 * row.median:.3f} ms ({row.median / base:.2f} gradients)" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    environment_header(f"scipy {scipy.__version__}", f"reps {args.reps}")
    for problem in args.problems:
        methods = METHODS[problem]
        star = optimum() if problem == "logistic" else None
        max_steps = 200
        rows = [method_row(problem, name, method, max_steps) for name, method in methods.items()]
        round_robin(rows, args.reps)
        seconds = {row.label: row.median for row in rows}
        last = {row.label: outcome(problem, *row.results[-1]) for row in rows}
        target = "‖∇f‖ ≤ 1e-8" if problem == "logistic" else "training loss ≤ 1e-5"
        print(f"\n({'a' if problem == 'logistic' else 'b'}) {problem}: target {target}; seconds: median of "
              f"{args.reps}")
        head = (f"{'method':26s}{'reached':>8s}{'steps':>7s}{'losses':>8s}{'grads':>7s}{'HVPs':>7s}"
                f"{'seconds':>9s}{'‖∇f‖':>10s}{'loss':>11s}")
        if star is not None:
            head += f"{'θ error':>10s}"
        print(head)
        print("-" * len(head))
        best = min(seconds[n] for n in methods if last[n].reached)
        for name in methods:
            o = last[name]
            grads = "-" if o.grads == 0 and o.hvps else str(o.grads)
            row = (f"{name:26s}{'yes' if o.reached else 'no':>8s}{o.steps:7d}{o.losses:8d}{grads:>7s}{o.hvps:7d}"
                   f"{seconds[name]:9.3f}{o.grad_norm:10.1e}{o.loss:11.4e}")
            if star is not None:
                row += f"{parameter_error(o.theta, star):10.1e}"
            print(row)
        print(f"fastest to the target: {best:.3f} s")
        if math.isfinite(best):
            ratios = ", ".join(f"{n} {seconds[n] / best:.1f}x" for n in methods if last[n].reached)
            print(f"time relative to the fastest (methods that reached the target): {ratios}")
    for problem in args.problems:
        product_costs(problem)


if __name__ == "__main__":
    main()
