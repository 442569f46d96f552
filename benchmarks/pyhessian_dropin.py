"""PyHessian against its drop-in, curvature.compat.pyhessian: the same calls, one run, values against the truth.

PyHessian's README usage on two problems: a small CNN with batch norm (in train mode, as PyHessian users pass
it; both libraries take the Hessian in eval mode) on one batch of 32 random 3x16x16 images, and the
64-32-10 tanh MLP of the examples on 512 of scikit-learn's digits. Float32 products, the truth from the dense
float64 Hessian (``curvature.reference``). For each library: ``eigenvalues(top_n=2)``, ``trace()`` and
``density()`` with their defaults; the relative error of each top eigenvalue, the trace estimate
(``np.mean`` of the returned list) with its error in units of the exact trace, the products (PyHessian's
counted by wrapping its ``hessian_vector_product``) and the seconds (medians of ``--reps``, round-robin).
PyHessian's ``density`` crashes on current torch (``torch.eig`` is gone); it is timed with ``torch.eig``
patched to ``torch.linalg.eigh``. Also: what building the object twice without ``zero_grad`` does to
PyHessian's numbers, and the model's mode afterwards.

Run (in the peer environment, which has PyHessian; see README.md):

    .venv-peers/bin/python benchmarks/pyhessian_dropin.py      # --reps 5
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _harness import environment_header, peer_versions  # noqa: E402
from _pyhessian import PYH_MODULE, PyHessianProducts, patched_torch_eig  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402
from curvature.compat.pyhessian import hessian as dropin  # noqa: E402

warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")


def cnn_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    return model, x, y


def mlp_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    std = X.std(0)
    std[std == 0] = 1.0
    X = torch.tensor((X - X.mean(0)) / std, dtype=torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return model, X[:512], torch.tensor(y[:512])


def truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, float]:
    twin = copy.deepcopy(model).eval()
    H = curvature.reference.hessian_matrix(twin, nn.CrossEntropyLoss(), (x, y))
    return torch.linalg.eigvalsh(H).flip(0).numpy(), float(torch.trace(H))


def run_pyhessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, counter: PyHessianProducts) -> dict:
    out = {}
    twin = copy.deepcopy(model)  # PyHessian switches the model to eval mode and writes into .grad
    start = time.perf_counter()
    comp = PYH_MODULE.hessian(twin, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    build = time.perf_counter() - start
    for name, call in (("eigenvalues", lambda: comp.eigenvalues(top_n=2)), ("trace", comp.trace)):
        counter.reset()
        start = time.perf_counter()
        out[name] = (call(), counter.count, time.perf_counter() - start + (build if name == "eigenvalues" else 0))
    counter.reset()
    start = time.perf_counter()
    try:
        comp.density()
        out["density"] = ("ran unpatched", counter.count, time.perf_counter() - start)
    except (AttributeError, RuntimeError) as error:  # torch.eig is gone
        crash = str(error).splitlines()[0]
        counter.reset()
        start = time.perf_counter()
        with patched_torch_eig():
            result = comp.density()
        out["density"] = (result, counter.count, time.perf_counter() - start, crash)
    return out


def run_dropin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    out = {}
    start = time.perf_counter()
    comp = dropin(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    build = time.perf_counter() - start
    for name, call in (("eigenvalues", lambda: comp.eigenvalues(top_n=2)), ("trace", comp.trace),
                       ("density", comp.density)):
        before, start = comp.num_matvecs, time.perf_counter()
        result = call()
        out[name] = (result, comp.num_matvecs - before,
                     time.perf_counter() - start + (build if name == "eigenvalues" else 0))
    out["trace_std_error"] = comp.trace_std_error
    return out


def doubling(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, bool, bool]:
    """λ_max from the second of two objects built on the same model without zero_grad, for both libraries.

    PyHessian's constructor runs ``loss.backward(create_graph=True)``, which adds into ``.grad``, and takes
    ``.grad`` as the gradient to differentiate: the second object sees the sum of both gradients.
    """
    twin = copy.deepcopy(model).train()
    torch.manual_seed(0)
    first = PYH_MODULE.hessian(twin, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    second = PYH_MODULE.hessian(twin, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    values = [obj.eigenvalues(tol=1e-6)[0][0] for obj in (first, second)]
    ours = copy.deepcopy(model).train()
    objects = [dropin(ours, nn.CrossEntropyLoss(), data=(x, y)) for _ in range(2)]
    with warnings.catch_warnings():  # float32 cannot certify 1e-6 here (curvature says so); the ratio is the point
        warnings.simplefilter("ignore", curvature.PrecisionWarning)
        again = [obj.eigenvalues(tol=1e-6)[0][0] for obj in objects]
    return values[0], values[1], again[1] / again[0], twin.training, ours.training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if PYH_MODULE is None:
        raise SystemExit("PyHessian is not installed here: run this in the peer environment (README.md).")
    torch.set_num_threads(args.threads)
    environment_header(f"reps {args.reps}", f"peers: {peer_versions({'PyHessian': PYH_MODULE})}")
    counter = PyHessianProducts()
    for name, make in (("CNN with batch norm, 32 images", cnn_problem), ("MLP 64-32-10, 512 digits", mlp_problem)):
        model, x, y = make()
        eigs, exact_trace = truth(model, x, y)
        runs: dict[str, list[dict]] = {"PyHessian": [], "curvature drop-in": []}
        with counter.installed():
            for _ in range(args.reps):
                torch.manual_seed(0)  # PyHessian draws from the global generator
                runs["PyHessian"].append(run_pyhessian(model, x, y, counter))
                runs["curvature drop-in"].append(run_dropin(model, x, y))
        params = sum(p.numel() for p in model.parameters())
        print(f"\n{name} ({params} parameters); truth: top eigenvalues {eigs[0]:.6g}, {eigs[1]:.6g}; "
              f"trace {exact_trace:.6g}")
        print(f"{'library':20s}{'call':13s}{'result':44s}{'error':>22s}{'HVPs':>7s}{'seconds':>9s}")
        for library, results in runs.items():
            last = results[-1]
            values, products, _ = last["eigenvalues"][:3]
            errors = ", ".join(f"{v / e - 1:+.1e}" for v, e in zip(values[0], eigs))
            seconds = statistics.median(r["eigenvalues"][2] for r in results)
            print(f"{library:20s}{'eigenvalues':13s}{', '.join(f'{v:.6g}' for v in values[0]):44s}{errors:>22s}"
                  f"{products:7d}{seconds:9.3f}")
            estimates, products, _ = last["trace"][:3]
            mean = float(np.mean(estimates))
            stated = f" ± {last['trace_std_error']:.3g}" if "trace_std_error" in last else ""
            seconds = statistics.median(r["trace"][2] for r in results)
            print(f"{'':20s}{'trace':13s}{f'{mean:.6g}{stated} ({len(estimates)} probes)':44s}"
                  f"{f'{mean / exact_trace - 1:+.1e}':>22s}{products:7d}{seconds:9.3f}")
            density = last["density"]
            seconds = statistics.median(r["density"][2] for r in results)
            label = "patched torch.eig" if len(density) == 4 else "100 nodes, weights sum to 1"
            print(f"{'':20s}{'density':13s}{label:44s}{'':>22s}{density[1]:7d}{seconds:9.3f}")
            if len(density) == 4:
                print(f"{'':33s}unpatched: {density[3][:70]}...")
        first, second, ratio, pyh_mode, our_mode = doubling(model, x, y)
        print(f"two objects built on the same model without zero_grad: PyHessian lambda_max {first:.6g} -> "
              f"{second:.6g} ({second / first:.2f}x); drop-in ratio {ratio:.6f}; model.training afterwards: "
              f"PyHessian {pyh_mode}, drop-in {our_mode}")


if __name__ == "__main__":
    main()
