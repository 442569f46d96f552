"""Curvature-product timings: curvature's operators against autograd, torch.func, PyHessian and curvlinops.

Two problems (an MLP and a small CNN, 1024 samples each, CrossEntropyLoss with mean reduction). Every row
is one way to get a Hessian (or GGN) product. The rows are timed round-robin, the k=1 rows and the k=16
rows as two separate rounds: after warm-up, each repetition runs every row of the round once in a fixed
order. The table reports the median over repetitions (with IQR and min) and its ratio to the median
gradient time, then checks the performance targets. A correctness check runs before any timing.

Run (the peers are optional; their rows are skipped with a note when they are not importable):

    python benchmarks/operators.py            # --reps 20 --device cpu --threads 2

See benchmarks/README.md for the peer environment and recorded results.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import copy  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
from _common import Problem  # noqa: E402  (benchmarks/_common.py: the script's directory is on sys.path)
from _harness import Row, Stats, environment_header, peer_versions, print_load, round_robin, spread_note  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, jvp  # noqa: E402

import curvature  # noqa: E402

# The peers' own noise: curvlinops (via torch.jit.script) on import, PyHessian's loss.backward(create_graph=True).
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script. is deprecated")
warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")

try:
    import pyhessian
    import pyhessian.utils
except ImportError:  # the project's own venv has no peers
    pyhessian = None
try:
    import curvlinops
except ImportError:
    curvlinops = None

PEER_DISTS = {"PyHessian": pyhessian, "curvlinops-for-pytorch": curvlinops}
NUM_SAMPLES = 1024
K = 16
CHECK_TOL = 1e-4  # float32: products agree to ~1e-6 relative; anything above this is a bug

# Row labels (the targets below refer to rows by label).
GRAD = "gradient (forward + backward)"
DB, FOR = "double-backward HVP, fresh", "forward-over-reverse HVP (torch.func), fresh"
HV, HV_FRESH = "curvature H @ v", "curvature H @ v, fresh (keep_graph=False)"
HV_ONESHOT = "curvature HessianOperator(...) @ v, one-shot"
GV, GV_FRESH = "curvature G @ v (GGN)", "curvature G @ v, fresh (keep_graph=False)"
PYH_HV, CL_HV, CL_GV = "pyhessian H @ v", "curvlinops H @ v", "curvlinops G @ v"
HM, HM_VEC = f"curvature H @ V (P,{K})", "curvature H @ V, vectorize=True"
HM_FRESH = "curvature H @ V, fresh (keep_graph=False)"
HM_COLS, DB_COLS = f"curvature {K} x H @ v", f"{K} x double-backward HVP, fresh"
CL_HM, PYH_COLS = "curvlinops H @ V", f"pyhessian {K} x H @ v"


# -- problems ------------------------------------------------------------------------------------------
def mlp_problem(device: torch.device) -> Problem:
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    x = torch.randn(NUM_SAMPLES, 64)
    return _problem("MLP 64-128-128-10 (tanh)", model, x, device)


def cnn_problem(device: torch.device) -> Problem:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    x = torch.randn(NUM_SAMPLES, 1, 16, 16)
    return _problem("CNN conv8/2-conv16-pool4-linear (relu, 1x16x16)", model, x, device)


def _problem(name: str, model: nn.Module, x: torch.Tensor, device: torch.device) -> Problem:
    y = torch.randint(0, 10, (NUM_SAMPLES,))
    return Problem(name, model.to(device), nn.CrossEntropyLoss(), x.to(device), y.to(device))


# -- flat <-> list helpers (applied inside every non-curvature row, so all rows map flat to flat) --------
def unflatten(v: torch.Tensor, params: list) -> list:
    return [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]


def flatten(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


# -- reference products ----------------------------------------------------------------------------------
def gradient(pb: Problem) -> torch.Tensor:
    loss = pb.loss_fn(pb.model(pb.x), pb.y)
    return flatten(torch.autograd.grad(loss, pb.params))


def double_backward_hvp(pb: Problem, v: torch.Tensor) -> torch.Tensor:
    params = pb.params
    loss = pb.loss_fn(pb.model(pb.x), pb.y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    return flatten(torch.autograd.grad(g, params, unflatten(v, params)))


def func_hvp(pb: Problem, v: torch.Tensor) -> torch.Tensor:
    names = [n for n, p in pb.model.named_parameters() if p.requires_grad]
    primals = {n: p.detach() for n, p in zip(names, pb.params)}
    tangents = dict(zip(names, unflatten(v, pb.params)))

    def loss(p: dict) -> torch.Tensor:
        return pb.loss_fn(functional_call(pb.model, p, (pb.x,)), pb.y)

    out = jvp(grad(loss), (primals,), (tangents,))[1]
    return flatten(out[n] for n in names)


def double_backward_ggn(pb: Problem, v: torch.Tensor) -> torch.Tensor:
    """``J^T (d2L/dz2) J v`` by autograd alone: ``J v`` through the double-backward trick."""
    params = pb.params
    z = pb.model(pb.x)
    u = torch.zeros_like(z, requires_grad=True)
    jt_u = torch.autograd.grad(z, params, u, create_graph=True)
    jv = torch.autograd.grad(jt_u, u, unflatten(v, params))[0]
    z_leaf = z.detach().requires_grad_(True)
    dz = torch.autograd.grad(pb.loss_fn(z_leaf, pb.y), z_leaf, create_graph=True)[0]
    hjv = torch.autograd.grad(dz, z_leaf, jv)[0]
    return flatten(torch.autograd.grad(z, params, hjv))


def columns(matvec: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor) -> torch.Tensor:
    return torch.stack([matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


# -- peers -----------------------------------------------------------------------------------------------
def pyhessian_matvec(pb: Problem) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """PyHessian's kept-graph product, on a deep copy (it switches the model to eval, fills .grad)."""
    if pyhessian is None:
        return None
    twin = copy.deepcopy(pb.model)
    hc = pyhessian.hessian(twin, pb.loss_fn, data=(pb.x, pb.y), cuda=pb.x.device.type == "cuda")

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return flatten(pyhessian.utils.hessian_vector_product(hc.gradsH, hc.params, unflatten(v, hc.params)))

    return matvec


def curvlinops_operators(pb: Problem) -> Optional[tuple]:
    if curvlinops is None:
        return None
    args = (pb.model, pb.loss_fn, pb.params, [(pb.x, pb.y)])
    kwargs = {"check_deterministic": False, "num_data": NUM_SAMPLES}
    return curvlinops.HessianLinearOperator(*args, **kwargs), curvlinops.GGNLinearOperator(*args, **kwargs)


# -- rows ------------------------------------------------------------------------------------------------
def curvature_rows(pb: Problem, v: torch.Tensor, V: torch.Tensor) -> tuple[list[Row], list[Row]]:
    """The baselines and curvature's rows as (k=1 rows, k=16 rows); operators are built outside the timing."""
    H, G = curvature.HessianOperator(*pb.args), curvature.GGNOperator(*pb.args)
    H_vec = curvature.HessianOperator(*pb.args, vectorize=True)
    H_fresh = curvature.HessianOperator(*pb.args, keep_graph=False)
    G_fresh = curvature.GGNOperator(*pb.args, keep_graph=False)
    k1 = [
        Row(GRAD, lambda: gradient(pb), group="k=1"),
        Row(DB, lambda: double_backward_hvp(pb, v), group="k=1"),
        Row(FOR, lambda: func_hvp(pb, v), group="k=1"),
        Row(HV, lambda: H @ v, group="k=1"),
        Row(HV_FRESH, lambda: H_fresh @ v, group="k=1"),
        Row(HV_ONESHOT, lambda: curvature.HessianOperator(*pb.args) @ v, group="k=1"),
        Row(GV, lambda: G @ v, group="k=1"),
        Row(GV_FRESH, lambda: G_fresh @ v, group="k=1"),
    ]
    kk = [
        Row(HM, lambda: H @ V, group=f"k={K}"),
        Row(HM_VEC, lambda: H_vec @ V, group=f"k={K}"),
        Row(HM_FRESH, lambda: H_fresh @ V, group=f"k={K}"),
        Row(HM_COLS, lambda: columns(H.__matmul__, V), group=f"k={K}"),
        Row(DB_COLS, lambda: columns(lambda c: double_backward_hvp(pb, c), V), group=f"k={K}"),
    ]
    return k1, kk


def peer_rows(pb: Problem, v: torch.Tensor, V: torch.Tensor) -> tuple[list[Row], list[Row], list[str]]:
    """PyHessian's and curvlinops' rows as (k=1 rows, k=16 rows, notes on skipped peers)."""
    k1, kk, notes = [], [], []
    pyh = pyhessian_matvec(pb)
    if pyh is None:
        notes.append("pyhessian is not importable: its rows are skipped.")
    else:
        k1.append(Row(PYH_HV, lambda: pyh(v), group="k=1"))
        kk.append(Row(PYH_COLS, lambda: columns(pyh, V), group=f"k={K}"))
    cl = curvlinops_operators(pb)
    if cl is None:
        notes.append("curvlinops is not importable: its rows are skipped.")
    else:
        k1 += [Row(CL_HV, lambda: cl[0] @ v, group="k=1"), Row(CL_GV, lambda: cl[1] @ v, group="k=1")]
        kk.append(Row(CL_HM, lambda: cl[0] @ V, group=f"k={K}"))
    return k1, kk, notes


def build_rows(pb: Problem, v: torch.Tensor, V: torch.Tensor) -> tuple[list[Row], list[str]]:
    """All timed rows of a problem, in timing order, and notes on skipped peers."""
    ours_k1, ours_kk = curvature_rows(pb, v, V)
    peers_k1, peers_kk, notes = peer_rows(pb, v, V)
    return ours_k1 + peers_k1 + ours_kk + peers_kk, notes


# -- correctness -----------------------------------------------------------------------------------------
def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm relative difference ``max|a - b| / max|b|``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def check_products(pb: Problem, rows: list[Row], v: torch.Tensor, V: torch.Tensor) -> float:
    """Compare every product row with autograd; print each difference and return the largest."""
    refs = {
        "H k=1": double_backward_hvp(pb, v),
        f"H k={K}": columns(lambda c: double_backward_hvp(pb, c), V),
        "G k=1": double_backward_ggn(pb, v),
    }
    worst = 0.0
    for row in rows:
        if row.label in (GRAD, DB, DB_COLS):
            continue
        kind = "G" if " G @" in row.label else "H"
        diff = rel_diff(row.fn(), refs[f"{kind} {row.group}"])
        worst = max(worst, diff)
        print(f"  {row.label:<48} vs double-backward {'GGN' if kind == 'G' else 'HVP'}: {diff:.1e}")
    print(f"  max relative difference: {worst:.1e} ({'OK' if worst < CHECK_TOL else 'FAIL'}, tolerance {CHECK_TOL})")
    return worst


# -- timing ----------------------------------------------------------------------------------------------
def time_sections(rows: list[Row], reps: int, warmup: int, device: torch.device) -> None:
    """Time each section (k=1, k=16) round-robin on its own, each round led by an untimed call of its first row.

    Mixing them in one round slows the rows that follow the k=16 products by up to 3x (the allocator
    gives their large buffers back to the system, and the next forward passes fault the pages in again),
    which would inflate the gradient baseline. The lead-in call absorbs a smaller order effect: the first row
    after the previous round's last one (e.g. curvlinops' vmapped product, which frees large buffers) measured
    5-20% slow.
    """
    for section in dict.fromkeys(r.group for r in rows):
        round_robin([r for r in rows if r.group == section], reps, warmup, device=device, lead_in=True)


def print_table(rows: list[Row]) -> dict[str, Stats]:
    """Print the table of medians in ms, with IQR, minimum and ratios to the first row (the gradient)."""
    stats = {row.label: row.stats(1e3) for row in rows}
    base = stats[rows[0].label]
    print("| row | k | median ms | IQR ms | min ms | x gradient (median) | x gradient (min) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        st = stats[row.label]
        print(f"| {row.label} | {row.group[2:]} | {st.median:.2f}{st.mark} | {st.q1:.2f}-{st.q3:.2f} | {st.min:.2f} "
              f"| {st.median / base.median:.2f} | {st.min / base.min:.2f} |")
    num_disturbed = sum(st.disturbed for st in stats.values())
    if num_disturbed:
        print(f"\n{spread_note(num_disturbed, len(stats))}")
    return stats


# -- targets ---------------------------------------------------------------------------------------------
@dataclass
class Check:
    desc: str
    median_ratio: float
    min_ratio: float
    bound: float
    required: bool  # False: shown for information, not a target

    @property
    def met(self) -> bool:
        return self.median_ratio <= self.bound


# (ours, theirs, bound, required): ours / theirs <= bound, on medians
TARGETS = [
    (HV, GRAD, 2.5, True),
    (HV_FRESH, GRAD, 2.5, False),
    (HM, DB_COLS, 1 / 1.3, True),
    (HM_VEC, DB_COLS, 1 / 1.3, False),
    (HM_FRESH, DB_COLS, 1 / 1.3, False),
    (HM, HM_COLS, 1.0, True),
    (HM_VEC, HM_COLS, 1.0, False),
    # against the peers: like with like (kept graph vs kept graph, recomputed vs recomputed) and defaults
    (HV, PYH_HV, 1.0, True),
    (HV, CL_HV, 1.0, True),
    (HV_FRESH, CL_HV, 1.0, True),
    (GV, CL_GV, 1.0, True),
    (GV_FRESH, CL_GV, 1.0, True),
    (HM, CL_HM, 1.0, True),
    (HM_FRESH, CL_HM, 1.0, True),
    (HM, PYH_COLS, 1.0, True),
]


def targets(stats: dict[str, Stats]) -> list[Check]:
    """Evaluate :data:`TARGETS`; comparisons with a peer that is not installed are left out."""
    return [
        Check(f"{ours} / {theirs} <= {bound:.2f}", stats[ours].median / stats[theirs].median,
              stats[ours].min / stats[theirs].min, bound, required)
        for ours, theirs, bound, required in TARGETS
        if theirs in stats
    ]


def print_targets(checks: list[Check]) -> None:
    for c in checks:
        status = ("met " if c.met else "MISS") if c.required else "info"
        print(f"  [{status}] {c.desc}: {c.median_ratio:.2f} (min-based {c.min_ratio:.2f})")


# -- main ------------------------------------------------------------------------------------------------
def run_problem(pb: Problem, reps: int, warmup: int, device: torch.device) -> list[Check]:
    print(f"\n## {pb.name}: P = {pb.num_params}, N = {NUM_SAMPLES}\n")
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(pb.num_params, generator=gen).to(device)
    V = torch.randn(pb.num_params, K, generator=gen).to(device)
    rows, notes = build_rows(pb, v, V)
    for note in notes:
        print(f"note: {note}")
    print("correctness (max|a - b| / max|b|):")
    if check_products(pb, rows, v, V) >= CHECK_TOL:
        raise SystemExit(f"{pb.name}: products disagree; not timing them.")
    print()
    time_sections(rows, reps, warmup, device)
    stats = print_table(rows)
    print("\ntargets (median ratio decides; info lines are not targets):")
    checks = targets(stats)
    print_targets(checks)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    device = torch.device(args.device)
    environment_header(f"device {device}", "float32", f"reps {args.reps}", f"warmup {args.warmup}",
                       f"peers: {peer_versions(PEER_DISTS)}", device=device)
    summary = []
    for name in args.problems:
        torch.manual_seed(0)
        pb = {"mlp": mlp_problem, "cnn": cnn_problem}[name](device)
        summary += [(pb.name.split()[0], c) for c in run_problem(pb, args.reps, args.warmup, device) if c.required]
    print()
    print_load()
    missed = [(problem, c) for problem, c in summary if not c.met]
    print(f"\n# summary: {len(summary) - len(missed)} of {len(summary)} targets met (on medians)")
    for problem, c in missed:
        print(f"  MISS [{problem}] {c.desc}: {c.median_ratio:.2f} (min-based {c.min_ratio:.2f})")


if __name__ == "__main__":
    main()
