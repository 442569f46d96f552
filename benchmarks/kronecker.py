"""Kronecker-factored curvature (issue 17): K-FAC and EK-FAC against a gradient, curvlinops, BackPACK and the exact GGN.

Four parts, one process (``--parts``, default all):

speed    On three problems -- the digits MLP 64-128-128-10 (tanh, the 1347-sample training split of
         ``curvature.cli.digits.load_split`` as one batch), a CNN on the same digits as 1x8x8 images, and a 2-layer
         GPT-style transformer (``benchmarks/_transformer.py``, untied, random tokens) -- the time of K-FAC's factors
         (``fisher_type`` "mc", "empirical", "ggn"), EK-FAC's (total, and its correction pass as EK-FAC minus K-FAC),
         a K-FAC and EK-FAC product, and an inverse product (first, with the eigendecompositions, and cached), in
         units of one gradient (forward + backward of the same loss on the same data); the same for curvlinops'
         ``KFACLinearOperator`` / ``EKFACLinearOperator`` (``type-2`` / ``mc`` / ``empirical``, the same
         ``kfac_approx`` "expand", ``separate_weight_and_bias=False``) and BackPACK's ``KFAC`` / ``KFLR``
         extensions; and the memory of the factors against the parameters.
agree    Dense float64 matrices of ours and curvlinops' on small versions of the problems, relative Frobenius
         difference, where the definitions agree (expected at rounding level) and where they differ by definition
         (measured, so the README can list by how much).
quality  Relative Frobenius error of K-FAC and EK-FAC ("ggn" and "mc") to the exact GGN restricted to the
         block diagonal and to the full GGN, and the overlap of the top-10 eigenspaces, on three small models.
pcg      ``curvature.solve`` on the damped GGN of the digits MLP with and without ``preconditioner=K.inverse(d)``:
         products with the GGN to a relative residual of 1e-6 (needs ``solve(..., preconditioner=)``; the part says
         so and is skipped where ``curvature.solve`` has no such argument).

Timing method (``_harness.round_robin``): the rows of a section are timed round-robin -- after warm-up rounds every
repetition runs every row once, led by an untimed call of the section's first row -- so that load from other
processes hits all rows alike; tables report medians (with quartiles and the minimum) and ratios to the section's
own gradient row. Fresh factor computations are timed on a built operator: ours after ``clear_cache()`` (untimed),
curvlinops' on an operator built untimed with ``check_deterministic=False`` and ``num_data`` /
``num_per_example_loss_terms`` given (its constructor then touches no data; a second ``compute_kronecker_factors``
on the same operator would add to the factors), BackPACK as a forward and a ``backward()`` inside its context.
Products are timed ``INNER`` at a time and reported per product.

Run (the peers are optional; their columns are skipped with a note when they are not importable):

    .venv-peers/bin/python benchmarks/kronecker.py          # --threads 1 --reps 15 --parts speed agree quality pcg

One torch thread by default: on this 2-core machine other processes run at the same time, and with 2 threads the
OpenMP workers of a gradient wait for a descheduled partner (measured: the digits-MLP gradient took 2.4-190 ms with
2 threads under load, 4-9 ms with 1). See benchmarks/README.md, "Issue 17", for the recorded results.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import copy  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import torch  # noqa: E402
from _harness import Row, Stats, environment_header, peer_versions, print_load, round_robin, spread_note  # noqa: E402
from _transformer import GPTConfig, NextTokenLM, token_batch  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402
from curvature.cli.digits import load_split  # noqa: E402

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script. is deprecated")  # curvlinops' import
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Full backward hook is firing")  # BackPACK's hooks, inputs without grad

try:
    import curvlinops
except ImportError:  # the project's own venv has no peers
    curvlinops = None
try:
    import backpack
    import backpack.extensions
except ImportError:
    backpack = None

PEER_DISTS = {"curvlinops-for-pytorch": curvlinops, "backpack-for-pytorch": backpack}
DAMPING = 1e-3  # the inverse products' damping in the speed part
INNER = 10  # products per timed call
TARGETS = {"factors": 1.3, "product": 0.1, "correction": 2.0}  # in gradients (issue 17)


# -- problems --------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A model, its loss, one batch, and the parameters timed (by name): the same for every library.

    ``names`` are the parameters every library factors; ``note`` says what was left out and why.
    """

    name: str
    model: nn.Module
    loss_fn: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    names: list[str]
    note: str = ""
    backpack: bool = True  # BackPACK's second-order extensions support the model
    ekfac_peer: bool = True  # curvlinops' EKFAC accepts the output (2-D only)

    @property
    def params(self) -> list[torch.Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def loss_terms(self) -> int:
        """Loss terms per sample (curvlinops' ``num_per_example_loss_terms``): the positions of an N-D output."""
        return self.y[0].numel() if isinstance(self.loss_fn, nn.CrossEntropyLoss) else 1


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The standardized digits training split: (1347, 64) inputs, (1347,) labels."""
    x, _, y, _ = load_split(dtype)
    return x, y


def linear_names(model: nn.Module, types: tuple = (nn.Linear, nn.Conv2d)) -> list[str]:
    """The names of the parameters owned by modules of ``types``, in ``model.named_parameters()`` order."""
    owned = {id(p) for m in model.modules() if isinstance(m, types) for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if id(p) in owned]


def mlp_case() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    x, y = digits()
    return Case("digits MLP 64-128-128-10 (tanh)", model, nn.CrossEntropyLoss(), x, y, linear_names(model))


def cnn_case() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    x, y = digits()
    return Case("digits CNN conv16-conv32/2-linear (relu, 1x8x8)", model, nn.CrossEntropyLoss(),
                x.reshape(-1, 1, 8, 8), y, linear_names(model))


TRANSFORMER = GPTConfig(vocab_size=32, context=16, n_layer=2, n_head=4, d_model=32, mlp_ratio=4, tied=False)


def transformer_case(batch: int = 64) -> Case:
    torch.manual_seed(0)
    model = NextTokenLM(TRANSFORMER)
    x, y = token_batch(TRANSFORMER, batch, TRANSFORMER.context, torch.Generator().manual_seed(0))
    return Case(
        "GPT 2x(d32, 4 heads, mlp 128), vocab 32, 64 sequences of 16 tokens", model, nn.CrossEntropyLoss(), x, y,
        linear_names(model, (nn.Linear,)),
        note="parameters: the 10 Linear layers (weights and biases), what curvlinops and ours both factor; ours "
             "also factors the token Embedding and the LayerNorms (row 'ours, all but pos'); the position "
             "Embedding is called on arange(T) without a batch dimension, so no K-FAC sees its per-sample rows "
             "(see the README)",
        backpack=False, ekfac_peer=False,
    )


CASES = {"mlp": mlp_case, "cnn": cnn_case, "transformer": transformer_case}


# -- building the operators ------------------------------------------------------------------------------------------
CL_FISHER = {"ggn": "type-2", "mc": "mc", "empirical": "empirical"}


def ours(case: Case, fisher_type: str, ekfac: bool = False, names: Optional[list[str]] = None,
         **kw: Any) -> curvature.KFACOperator:
    cls = curvature.EKFACOperator if ekfac else curvature.KFACOperator
    return cls(case.model, case.loss_fn, (case.x, case.y), params=names or case.names, fisher_type=fisher_type,
               generator=torch.Generator().manual_seed(0), **kw)


def theirs(case: Case, fisher_type: str, ekfac: bool = False, data: Any = None, known: bool = True,
           **kw: Any) -> Any:
    """curvlinops' operator, built without touching the data (``check_deterministic=False``, counts given)."""
    cls = curvlinops.EKFACLinearOperator if ekfac else curvlinops.KFACLinearOperator
    data = [(case.x, case.y)] if data is None else data
    counts = {"num_data": sum(x.shape[0] for x, _ in data), "num_per_example_loss_terms": case.loss_terms} \
        if known else {}
    options = {"separate_weight_and_bias": False, **kw}
    return cls(case.model, case.loss_fn, case.params, data, check_deterministic=False,
               fisher_type=CL_FISHER[fisher_type], **counts, **options)


def gradient(case: Case) -> None:
    torch.autograd.grad(case.loss_fn(case.model(case.x), case.y), case.params)


def repeat(fn: Callable[[], Any], times: int = INNER) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            fn()
    return run


def fresh(op: curvature.KFACOperator) -> Callable[[int], tuple]:
    """Untimed set-up: forget the factors (the timed call computes them again)."""
    def prepare(_: int) -> tuple:
        op.clear_cache()
        return ()
    return prepare


def recomputed(op: curvature.KFACOperator) -> Callable[[int], tuple]:
    """Untimed set-up: fresh factors, whose eigendecompositions are not computed yet."""
    def prepare(_: int) -> tuple:
        op.clear_cache()
        op.compute()
        return ()
    return prepare


# -- part 1: speed ---------------------------------------------------------------------------------------------------
GRAD = "gradient (forward + backward)"


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    inner: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, fn: Callable[..., Any], prepare: Optional[Callable[[int], tuple]] = None,
            inner: int = 1) -> None:
        self.rows.append(Row(label, fn, prepare, group=self.name))
        self.inner[label] = inner


def speed_sections(case: Case, slow_ggn: bool) -> tuple[list[Section], list[str], dict[str, Any]]:
    """The timed rows of a problem in three sections (factors, products, slow factors) and notes on skipped peers.

    The slow section holds our EK-FAC "ggn" and, where ``slow_ggn``, our K-FAC "ggn" (one backward pass per output
    unit and position of a sequence output).
    """
    notes: list[str] = []
    v = torch.randn(case.num_params, generator=torch.Generator().manual_seed(1))
    factors, products, slow = Section("factors"), Section("products"), Section("slow")
    for section in (factors, products, slow):
        section.add(GRAD, lambda: gradient(case))
    built: dict[str, Any] = {}
    for ft in ("mc", "empirical", "ggn"):
        op = built[f"K {ft}"] = ours(case, ft)
        target = slow if ft == "ggn" and slow_ggn else factors
        target.add(f"ours K-FAC factors, {ft}", op.compute, fresh(op))
    for ft in ("mc", "ggn"):
        op = built[f"E {ft}"] = ours(case, ft, ekfac=True)
        target = slow if ft == "ggn" else factors
        target.add(f"ours EK-FAC factors + correction, {ft}", op.compute, fresh(op))
    factors.add("ours build + K-FAC factors, mc", lambda: ours(case, "mc").compute())
    if case.note:
        everything = [n for n in dict(case.model.named_parameters()) if not n.endswith("pos.weight")]
        op_all = ours(case, "mc", names=everything)
        factors.add("ours K-FAC factors, mc, all but pos", op_all.compute, fresh(op_all))
    K, E = built["K mc"], built["E mc"]
    K.compute()
    E.compute()
    Ki, Ei = K.inverse(DAMPING), E.inverse(DAMPING)
    Ki @ v, Ei @ v
    products.add("ours K-FAC @ v", repeat(lambda: K @ v), inner=INNER)
    K_unverified = ours(case, "mc", verify=False)
    K_unverified.compute()
    products.add("ours K-FAC @ v, verify=False", repeat(lambda: K_unverified @ v), inner=INNER)
    products.add(f"ours K-FAC inverse({DAMPING:g}) @ v, first (eigh)", lambda: K.inverse(DAMPING) @ v, recomputed(K))
    products.add("ours K-FAC inverse @ v, cached", repeat(lambda: Ki @ v), inner=INNER)
    products.add("ours EK-FAC @ v", repeat(lambda: E @ v), inner=INNER)
    products.add("ours EK-FAC inverse @ v, cached", repeat(lambda: Ei @ v), inner=INNER)

    if curvlinops is None:
        notes.append("curvlinops is not importable: its rows are skipped.")
    else:
        for ft in ("mc", "empirical", "ggn"):
            factors.add(f"curvlinops KFAC factors, {CL_FISHER[ft]}", lambda op: op.compute_kronecker_factors(),
                        lambda _, ft=ft: (theirs(case, ft),))
        if case.ekfac_peer:
            for ft in ("mc", "ggn"):
                factors.add(f"curvlinops EKFAC factors + correction, {CL_FISHER[ft]}",
                            lambda op: op._maybe_compute_ekfac(), lambda _, ft=ft: (theirs(case, ft, ekfac=True),))
        else:
            notes.append("curvlinops' EKFACLinearOperator refuses outputs with more than 2 dimensions: its EK-FAC "
                         "rows are skipped.")
        factors.add("curvlinops build + KFAC factors, mc (counts inferred)",
                    lambda: theirs(case, "mc", known=False).compute_kronecker_factors())
        CK = theirs(case, "mc")
        CK.compute_kronecker_factors()
        inverse = curvlinops.KFACInverseLinearOperator
        CKi = inverse(CK, damping=DAMPING, use_exact_damping=True)
        CKd = inverse(CK, damping=DAMPING)
        CKi @ v, CKd @ v
        products.add("curvlinops KFAC @ v", repeat(lambda: CK @ v), inner=INNER)
        products.add("curvlinops inverse @ v, exact damping, first (eigh)",
                     lambda: inverse(CK, damping=DAMPING, use_exact_damping=True) @ v)
        products.add("curvlinops inverse @ v, exact damping, cached", repeat(lambda: CKi @ v), inner=INNER)
        products.add("curvlinops inverse @ v, default damping (A+dI)x(G+dI), first",
                     lambda: inverse(CK, damping=DAMPING) @ v)
        products.add("curvlinops inverse @ v, default damping, cached", repeat(lambda: CKd @ v), inner=INNER)
        if case.ekfac_peer:
            CE = theirs(case, "mc", ekfac=True)
            CE._maybe_compute_ekfac()
            CEi = inverse(CE, damping=DAMPING, use_exact_damping=True)
            CEi @ v
            products.add("curvlinops EKFAC @ v", repeat(lambda: CE @ v), inner=INNER)
            products.add("curvlinops EKFAC inverse @ v, cached", repeat(lambda: CEi @ v), inner=INNER)
        built["curvlinops"] = CK
    if backpack is None:
        notes.append("BackPACK is not importable: its rows are skipped.")
    elif not case.backpack:
        notes.append("BackPACK: skipped, its second-order extensions have no LayerNorm, Embedding or attention "
                     "(matmul/softmax inside a module) and need the model as an nn.Sequential of supported layers.")
    else:
        extensions = backpack.extensions
        for label, ext in (("KFAC (mc, 1 sample)", extensions.KFAC), ("KFLR (type-2)", extensions.KFLR)):
            model = backpack.extend(copy.deepcopy(case.model))
            loss_fn = backpack.extend(copy.deepcopy(case.loss_fn))
            factors.add(f"BackPACK {label}: forward + backward",
                        lambda model=model, loss_fn=loss_fn, ext=ext: _backpack_step(model, loss_fn, ext, case),
                        _no_grads(model))
    if not slow.rows[1:]:
        slow.rows.clear()
    return [s for s in (factors, products, slow) if s.rows], notes, built


def _no_grads(model: nn.Module) -> Callable[[int], tuple]:
    """Untimed set-up: no ``.grad`` to accumulate into (BackPACK's ``backward()`` fills them)."""
    def prepare(_: int) -> tuple:
        model.zero_grad(set_to_none=True)
        return ()
    return prepare


def _backpack_step(model: nn.Module, loss_fn: nn.Module, ext: Any, case: Case) -> None:
    with backpack.backpack(ext()):
        loss_fn(model(case.x), case.y).backward()


def factor_bytes(case: Case, built: dict[str, Any]) -> list[tuple[str, int]]:
    """What the factors hold, in bytes, next to the parameters."""
    K, E = built["K mc"], built["E mc"]

    def size(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    state = K.state_dict()["blocks"]
    k_bytes = size(t for block in state.values() for t in block.values())
    e_bytes = size(t for block in E.state_dict()["blocks"].values() for t in block.values())
    eig = size(t for b in K.eigh() for t in (b.eigenvalues, b.row_eigenvectors, b.col_eigenvectors))
    rows = [("parameters (P x 4 bytes)", case.num_params * 4), ("ours K-FAC factors", k_bytes),
            ("ours K-FAC eigendecompositions (after inverse/eigh)", eig),
            ("ours EK-FAC factors + fitted eigenvalues", e_bytes)]
    if "curvlinops" in built:
        CK = built["curvlinops"]
        rows.append(("curvlinops KFAC factors", size([*CK._input_covariances.values(),
                                                      *CK._gradient_covariances.values()])))
    return rows


def print_section(section: Section) -> dict[str, Stats]:
    stats = {}
    for row in section.rows:
        stats[row.label] = row.stats(1e3 / section.inner[row.label])
    base = stats[GRAD]
    unit = f"ms per product, {INNER} products per timed call" if section.name == "products" else "ms per computation"
    print(f"\n{section.name} ({unit}):\n")
    print("| row | median ms | IQR ms | min ms | x gradient (median) | x gradient (min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, st in stats.items():
        print(f"| {label} | {st.median:.3f}{st.mark} | {st.q1:.3f}-{st.q3:.3f} | {st.min:.3f} "
              f"| {st.median / base.median:.3f} | {st.min / base.min:.3f} |")
    disturbed = sum(st.disturbed for st in stats.values())
    if disturbed:
        print(f"\n{spread_note(disturbed, len(stats))}")
    return stats


def run_speed(case: Case, reps: int, warmup: int, slow_reps: int) -> list[tuple[str, float, float, bool]]:
    slow_ggn = case.y.ndim > 1  # ours runs one backward pass per output unit and position: T x C of them
    print(f"\n### {case.name}: P = {case.num_params}, N = {case.x.shape[0]}\n")
    if case.note:
        print(f"note: {case.note}")
    sections, notes, built = speed_sections(case, slow_ggn)
    for note in notes:
        print(f"note: {note}")
    unit: dict[str, float] = {}
    ratio: dict[str, float] = {}
    for section in sections:
        round_robin(section.rows, slow_reps if section.name == "slow" else reps, warmup, lead_in=True)
        stats = print_section(section)
        unit[section.name] = stats[GRAD].median
        for label, st in stats.items():
            if label != GRAD:
                ratio[label] = st.median / stats[GRAD].median
    print("\nfactor memory:\n")
    print("| what | bytes | x parameters |")
    print("|---|---:|---:|")
    sizes = factor_bytes(case, built)
    for label, b in sizes:
        print(f"| {label} | {b:,} | {b / sizes[0][1]:.2f} |")
    checks = [
        ("K-FAC factors, mc", ratio["ours K-FAC factors, mc"], TARGETS["factors"], True),
        ("K-FAC @ v", ratio["ours K-FAC @ v"], TARGETS["product"], True),
        ("K-FAC inverse @ v, cached", ratio["ours K-FAC inverse @ v, cached"], TARGETS["product"], True),
        ("K-FAC inverse @ v, first (eigh)", ratio[f"ours K-FAC inverse({DAMPING:g}) @ v, first (eigh)"],
         TARGETS["product"], False),
        ("EK-FAC @ v", ratio["ours EK-FAC @ v"], TARGETS["product"], False),
        ("EK-FAC correction, mc (EK-FAC - K-FAC)",
         ratio["ours EK-FAC factors + correction, mc"] - ratio["ours K-FAC factors, mc"], TARGETS["correction"], True),
        ("EK-FAC correction, ggn (EK-FAC - K-FAC)",
         ratio["ours EK-FAC factors + correction, ggn"] - ratio["ours K-FAC factors, ggn"], TARGETS["correction"],
         False),
    ]
    for mine, peer in (("ours K-FAC factors, mc", "curvlinops KFAC factors, mc"),
                       ("ours K-FAC factors, empirical", "curvlinops KFAC factors, empirical"),
                       ("ours K-FAC factors, ggn", "curvlinops KFAC factors, type-2"),
                       ("ours EK-FAC factors + correction, mc", "curvlinops EKFAC factors + correction, mc"),
                       ("ours K-FAC @ v", "curvlinops KFAC @ v"),
                       ("ours K-FAC inverse @ v, cached", "curvlinops inverse @ v, exact damping, cached"),
                       (f"ours K-FAC inverse({DAMPING:g}) @ v, first (eigh)",
                        "curvlinops inverse @ v, exact damping, first (eigh)"),
                       ("ours EK-FAC @ v", "curvlinops EKFAC @ v"),
                       ("ours K-FAC factors, mc", "BackPACK KFAC (mc, 1 sample): forward + backward"),
                       ("ours K-FAC factors, ggn", "BackPACK KFLR (type-2): forward + backward")):
        if peer in ratio:
            checks.append((f"{mine} / {peer}", ratio[mine] / ratio[peer], 1.0, False))
    print("\ntargets (median ratios; 'info' lines are no target of the issue):")
    out = []
    for desc, value, bound, required in checks:
        unit_name = "" if "/" in desc else " gradients"
        status = ("met " if value <= bound else "MISS") if required else "info"
        print(f"  [{status}] {desc}: {value:.3f}{unit_name} (bound {bound:g})")
        if required:
            out.append((desc, value, bound, value <= bound))
    return out


# -- part 2: agreement with curvlinops -------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_F / ||b||_F``."""
    return float((a - b).norm() / b.norm())


def small_cases() -> dict[str, Case]:
    """Small float64 versions of the problems (dense matrices in seconds); data in two uneven batches."""
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    x, y = x[:40], y[:40]
    mlp = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).double()
    reg = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    target = torch.randn(40, 3, dtype=torch.float64)
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
                            nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 10)).double()
    out = {
        "MLP, CE mean": Case("MLP", mlp, nn.CrossEntropyLoss(), x, y, linear_names(mlp)),
        "MLP, CE sum": Case("MLP", mlp, nn.CrossEntropyLoss(reduction="sum"), x, y, linear_names(mlp)),
        "MLP, MSE mean (3 outputs)": Case("reg", reg, nn.MSELoss(), x, target, linear_names(reg)),
        "MLP, MSE sum (3 outputs)": Case("reg", reg, nn.MSELoss(reduction="sum"), x, target, linear_names(reg)),
        "CNN, CE mean": Case("CNN", cnn, nn.CrossEntropyLoss(), x.reshape(-1, 1, 8, 8), y, linear_names(cnn)),
        "grouped CNN (groups=2), CE mean": Case("gCNN", grouped, nn.CrossEntropyLoss(), x.reshape(-1, 1, 8, 8), y,
                                               linear_names(grouped)),
    }
    cfg = GPTConfig(vocab_size=7, context=5, n_layer=1, n_head=2, d_model=4, mlp_ratio=2, tied=False)
    lm = NextTokenLM(cfg).double()
    tokens, nxt = token_batch(cfg, 12, 5, torch.Generator().manual_seed(0))
    out["GPT (Linear params), CE mean over positions"] = Case("GPT", lm, nn.CrossEntropyLoss(), tokens, nxt,
                                                             linear_names(lm, (nn.Linear,)), ekfac_peer=False)
    masked = nxt.clone()
    masked[:, ::2] = -100
    out["GPT, CE mean, ignore_index on half the tokens"] = Case(
        "GPT", lm, nn.CrossEntropyLoss(), tokens, masked, linear_names(lm, (nn.Linear,)), ekfac_peer=False)
    return out


def batches(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The case's data as two uneven batches (the dataset normalization is part of the comparison)."""
    cut = case.x.shape[0] * 5 // 8
    return [(case.x[:cut], case.y[:cut]), (case.x[cut:], case.y[cut:])]


def dense_ours(case: Case, fisher_type: str, ekfac: bool = False, **kw: Any) -> torch.Tensor:
    cls = curvature.EKFACOperator if ekfac else curvature.KFACOperator
    return cls(case.model, case.loss_fn, batches(case), params=case.names, fisher_type=fisher_type,
               generator=torch.Generator().manual_seed(0), **kw).to_dense()


def dense_theirs(case: Case, fisher_type: str, ekfac: bool = False, **kw: Any) -> torch.Tensor:
    op = theirs(case, fisher_type, ekfac=ekfac, data=batches(case), **kw)
    return op @ torch.eye(case.num_params, dtype=torch.float64)


def exact_ggn(case: Case, data: Any = None) -> torch.Tensor:
    data = batches(case) if data is None else data
    return curvature.GGNOperator(case.model, case.loss_fn, data, params=case.names).to_dense()


def exact_blocks(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact GGN of the case's two batches, and its restriction to K-FAC's layer blocks."""
    G = exact_ggn(case)
    return G, G * layer_mask(curvature.KFACOperator(case.model, case.loss_fn, batches(case), params=case.names))


def layer_mask(op: curvature.KFACOperator) -> torch.Tensor:
    """True inside the operator's blocks (one per layer: weight and bias jointly; per group not separated)."""
    sizes = [p.numel() for p in op.params]
    label = [0] * len(sizes)
    for k, layer in enumerate(op.layers):
        for i in layer.indices:
            label[i] = k
    labels = torch.cat([torch.full((s,), lab) for s, lab in zip(sizes, label)])
    return labels[:, None] == labels[None, :]


def basis_dependent(E: curvature.EKFACOperator) -> bool:
    """Whether EK-FAC's fitted eigenvalues depend on the arbitrary basis ``eigh`` picks in a repeated eigenvalue.

    That happens when a factor has a null space of dimension 2 or more (eigenvalues below 1e-12 of its largest) in
    which the per-sample gradients still have weight: K-FAC-reduce's input factor averages the rows, the fit uses
    their sum, so they need not lie in its range. Two libraries' EK-FACs can then both be right and differ.
    """
    for eig, state in zip(E.eigh(), E.state_dict()["blocks"].values()):
        s = eig.eigenvalues
        for factor, axis in ((state["row"], -1), (state["col"], -2)):
            if factor.ndim == 2:  # a diagonal factor: its eigenvectors are the unit vectors
                continue
            lam = torch.linalg.eigvalsh(factor)
            null = lam <= 1e-12 * lam.max(-1, keepdim=True).values
            if int(null.sum(-1).max()) < 2:
                continue
            weight = (s * null.unsqueeze(axis)).abs().max()
            if weight > 1e-10 * s.abs().max():
                return True
    return False


def run_agree() -> list[tuple[str, float, bool]]:
    """Print the agreement tables; return (what, difference, within 1e-6) for the 'should agree' rows."""
    if curvlinops is None:
        print("\ncurvlinops is not importable: part 'agree' is skipped.")
        return []
    cases = small_cases()
    print("\n### Where the definitions agree (ours with curvlinops' separate_weight_and_bias=False), float64\n")
    print("relative Frobenius difference ||ours - curvlinops||_F / ||curvlinops||_F of the dense matrices; data in "
          "two uneven batches; † = EK-FAC not unique (see basis_dependent), not counted\n")
    print("| problem | P | fisher | kfac_approx | K-FAC | EK-FAC |")
    print("|---|---:|---|---|---:|---:|")
    out = []
    for key in ("MLP, CE mean", "MLP, CE sum", "MLP, MSE mean (3 outputs)", "MLP, MSE sum (3 outputs)",
                "CNN, CE mean"):
        case = cases[key]
        fishers = ("ggn",) if "MSE mean" in key else ("ggn", "empirical")  # MSE mean empirical: see the differences
        for ft in fishers:
            for approx in ("expand", "reduce"):
                k = rel(dense_ours(case, ft, kfac_approx=approx), dense_theirs(case, ft, kfac_approx=approx))
                E = curvature.EKFACOperator(case.model, case.loss_fn, batches(case), params=case.names,
                                            fisher_type=ft, kfac_approx=approx)
                e = rel(E.to_dense(), dense_theirs(case, ft, True, kfac_approx=approx))
                unique = not basis_dependent(E)
                print(f"| {key} | {case.num_params} | {ft} / {CL_FISHER[ft]} | {approx} | {k:.1e} | "
                      f"{e:.1e}{'' if unique else ' †'} |")
                out.append((f"{key} {ft} {approx} K-FAC", k, k <= 1e-6))
                if unique:
                    out.append((f"{key} {ft} {approx} EK-FAC", e, e <= 1e-6))
    case = cases["MLP, MSE sum (3 outputs)"]
    print("\ninverses, traces, log-determinants, norms (MLP, MSE sum, ggn / type-2, expand; curvlinops' inverse with "
          "use_exact_damping=True, or use_heuristic_damping=True):\n")
    print("| quantity | ours | curvlinops | relative difference |")
    print("|---|---:|---:|---:|")
    data = batches(case)
    K = curvature.KFACOperator(case.model, case.loss_fn, data, params=case.names)
    E = curvature.EKFACOperator(case.model, case.loss_fn, data, params=case.names)
    CK, CE = theirs(case, "ggn", data=data), theirs(case, "ggn", ekfac=True, data=data)
    eye = torch.eye(case.num_params, dtype=torch.float64)
    inverse = curvlinops.KFACInverseLinearOperator
    for d in (1e-3, 1e-1):
        for label, mine, peer in (
                ("K-FAC inverse, exact damping", K.inverse(d), inverse(CK, damping=d, use_exact_damping=True)),
                ("K-FAC inverse, heuristic damping", K.inverse(d, heuristic_damping=True),
                 inverse(CK, damping=d, use_heuristic_damping=True)),
                ("EK-FAC inverse", E.inverse(d), inverse(CE, damping=d, use_exact_damping=True))):
            a, b = mine.to_dense(), peer @ eye
            diff = rel(a, b)
            print(f"| {label}, damping {d:g}: Frobenius norm | {float(a.norm()):.6g} | {float(b.norm()):.6g} "
                  f"| {diff:.1e} |")
            out.append((f"{label} {d:g}", diff, diff <= 1e-6))
    for label, mine, peer in (("trace", K.trace(), CK.trace), ("logdet", K.logdet(), CK.logdet),
                              ("Frobenius norm", K.frobenius_norm(), CK.frobenius_norm)):
        a, b = float(mine), float(peer)
        diff = 0.0 if a == b else abs(a - b) / abs(b)  # both -inf: a singular factor (pixels constant in the data)
        print(f"| K-FAC {label} | {a:.6g} | {b:.6g} | {diff:.1e} |")
        out.append((f"K-FAC {label}", diff, diff <= 1e-6))
    run_differences(cases)
    return out


def run_differences(cases: dict[str, Case]) -> None:
    """The settings where the two libraries define different matrices, measured."""
    print("\n### Where the definitions differ (measured; float64)\n")
    print("| setting | what differs | ‖ours − curvlinops‖ / ‖curvlinops‖ | ours vs exact | curvlinops vs exact "
          "| exact reference |")
    print("|---|---|---:|---:|---:|---|")
    case = cases["MLP, CE mean"]
    data = batches(case)
    _, Gb = exact_blocks(case)
    K = curvature.KFACOperator(case.model, case.loss_fn, data, params=case.names)
    mine = K.to_dense()
    sep = dense_theirs(case, "ggn", separate_weight_and_bias=True)
    print(f"| bias: curvlinops' default separate_weight_and_bias=True | W and b get separate blocks G x A_W and G "
          f"(no W-b coupling) | {rel(mine, sep):.2e} | {rel(mine, Gb):.3f} | {rel(sep, Gb):.3f} | GGN, layer blocks |")
    CK = theirs(case, "ggn", data=data)
    eye = torch.eye(case.num_params, dtype=torch.float64)
    for d in (1e-3, 1e-1):
        exact = torch.linalg.inv(mine + d * eye)
        default = curvlinops.KFACInverseLinearOperator(CK, damping=d) @ eye
        print(f"| inverse, curvlinops' default damping, d = {d:g} | (A+dI)^-1 x (G+dI)^-1 instead of (G x A + dI)^-1 "
              f"| {rel(K.inverse(d).to_dense(), default):.2e} | {rel(K.inverse(d).to_dense(), exact):.1e} "
              f"| {rel(default, exact):.3f} | inv(K + dI) |")
    case = cases["GPT (Linear params), CE mean over positions"]
    _, Gb = exact_blocks(case)
    for approx in ("expand", "reduce"):
        mine = dense_ours(case, "ggn", kfac_approx=approx)
        peer = dense_theirs(case, "ggn", kfac_approx=approx)
        print(f"| type-2 with 5 loss terms per sequence (GPT), {approx} | curvlinops backpropagates column c of "
              f"every position at once (cross-position terms); ours one column per position and class "
              f"| {rel(mine, peer):.3f} | {rel(mine, Gb):.3f} | {rel(peer, Gb):.3f} | GGN, layer blocks |")
    case = cases["GPT, CE mean, ignore_index on half the tokens"]
    G, Gb = exact_blocks(case)
    for ft in ("ggn", "empirical"):
        mine, peer = dense_ours(case, ft), dense_theirs(case, ft)
        trace = f"tr ours/curvlinops/exact {mine.trace():.4g}/{peer.trace():.4g}/{G.trace():.4g}"
        print(f"| ignore_index=-100 on half the targets, {ft} / {CL_FISHER[ft]} | curvlinops counts ignored "
              f"positions ({trace}) | {rel(mine, peer):.3f} | {rel(mine, Gb):.3f} | {rel(peer, Gb):.3f} "
              f"| GGN, layer blocks |")
    case = cases["grouped CNN (groups=2), CE mean"]
    _, Gb = exact_blocks(case)
    mine, peer = dense_ours(case, "ggn"), dense_theirs(case, "ggn")
    print(f"| grouped Conv2d (groups=2) | ours: one G x A per group (block diagonal in the groups); curvlinops: one A "
          f"of the group-averaged input, full G | {rel(mine, peer):.3f} | {rel(mine, Gb):.3f} | {rel(peer, Gb):.3f} "
          f"| GGN, layer blocks |")
    for key, factor, why in (("MLP, MSE mean (3 outputs)", 3, "C = 3 outputs"),
                             ("GPT (Linear params), CE mean over positions", 5, "T = 5 loss terms")):
        case = cases[key]
        for approx in ("expand", "reduce"):
            mine, peer = dense_ours(case, "empirical", kfac_approx=approx), dense_theirs(case, "empirical",
                                                                                     kfac_approx=approx)
            print(f"| empirical, {key}, {approx} | scale: ours c sum_n grad l_n grad l_n^T with l_n the loss of sample "
                  f"n alone (as curvature.EmpiricalFisherOperator); curvlinops {factor} x that ({why} per sample) "
                  f"| {rel(mine, peer):.3f} (ours x {factor}: {rel(factor * mine, peer):.1e}) | - | - | - |")
    case = cases["MLP, CE mean"]
    Kg, Cg = dense_ours(case, "ggn"), dense_theirs(case, "ggn")
    for m in (1, 100):
        mine, peer = dense_ours(case, "mc", mc_samples=m), dense_theirs(case, "mc", mc_samples=m)
        print(f"| mc, {m} sample(s) per data point (MLP) | independent draws (no common seed) | {rel(mine, peer):.3f} "
              f"| {rel(mine, Kg):.3f} | {rel(peer, Cg):.3f} | each library's own type-2 K-FAC |")


# -- part 3: quality -------------------------------------------------------------------------------------------------
def quality_cases() -> list[Case]:
    """Three small models (P < 3000) on data of their own, float64."""
    torch.manual_seed(0)
    x, y = digits(torch.float64)
    x, y = x[:512], y[:512]
    mlp = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Tanh(),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).double()
    cfg = GPTConfig(vocab_size=11, context=6, n_layer=1, n_head=2, d_model=8, mlp_ratio=2, tied=False)
    lm = NextTokenLM(cfg).double()
    tokens, nxt = token_batch(cfg, 64, 6, torch.Generator().manual_seed(0))
    lm_names = [n for n, _ in lm.named_parameters() if not n.endswith("pos.weight")]
    return [
        Case("digits MLP 64-32-10 (tanh), 512 samples", mlp, nn.CrossEntropyLoss(), x, y,
             linear_names(mlp)),
        Case("digits CNN conv4-conv8/2-linear (tanh), 512 samples", cnn, nn.CrossEntropyLoss(),
             x.reshape(-1, 1, 8, 8), y, linear_names(cnn)),
        Case("GPT 1x(d8, 2 heads), vocab 11, 64 x 6 tokens, all but pos", lm,
             nn.CrossEntropyLoss(), tokens, nxt, lm_names),
    ]


def top_overlap(A: torch.Tensor, B: torch.Tensor, k: int = 10) -> float:
    """``||Q_A^T Q_B||_F^2 / k`` for the top-``k`` eigenvectors of two symmetric matrices."""
    qa = torch.linalg.eigh(A)[1][:, -k:]
    qb = torch.linalg.eigh(B)[1][:, -k:]
    return float((qa.T @ qb).square().sum() / k)


def run_quality() -> None:
    print("\nrelative Frobenius error ||K - G||_F / ||G||_F to the exact GGN G (curvature.GGNOperator.to_dense, "
          "float64), restricted to K-FAC's layer blocks ('block') and in full ('full'); top-10: "
          "||Q_G^T Q_K||_F^2 / 10 for the top-10 eigenvectors of G and K. mc: 1 draw per data point, seed 0.\n")
    print("| model | P | approximation | error, block | error, full | top-10 overlap with G | with block(G) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for case in quality_cases():
        data = (case.x, case.y)
        G = exact_ggn(case, data)
        K0 = curvature.KFACOperator(case.model, case.loss_fn, data, params=case.names)
        Gb = G * layer_mask(K0)
        rows = [("block diagonal of G itself", Gb)]
        for ekfac in (False, True):
            for ft, m in (("ggn", 1), ("mc", 1), ("mc", 10)):
                if ft == "ggn" and m > 1:
                    continue
                cls = curvature.EKFACOperator if ekfac else curvature.KFACOperator
                op = cls(case.model, case.loss_fn, data, params=case.names, fisher_type=ft, mc_samples=m,
                         generator=torch.Generator().manual_seed(0))
                draws = f" ({m} draw{'s' if m > 1 else ''})" if ft == "mc" else ""
                label = f"{'EK-FAC' if ekfac else 'K-FAC'} {ft}{draws}"
                rows.append((label, op.to_dense()))
        for label, M in rows:
            print(f"| {case.name} | {case.num_params} | {label} | {rel(M, Gb):.3f} | {rel(M, G):.3f} "
                  f"| {top_overlap(G, M):.3f} | {top_overlap(Gb, M):.3f} |")


# -- part 4: K-FAC-preconditioned CG ---------------------------------------------------------------------------------
def run_pcg(reps: int) -> Optional[list[tuple[str, float, bool]]]:
    if "preconditioner" not in inspect.signature(curvature.solve).parameters:
        print("\ncurvature.solve has no preconditioner= argument in this version (branch 'precond' not merged): "
              "part 'pcg' is skipped.")
        return None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)).double()
    x, y = digits(torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    b = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(x), y), params)])
    G = curvature.GGNOperator(model, loss_fn, (x, y))
    preconditioners: dict[str, Callable[[float], Any]] = {
        "K-FAC ggn": lambda d: curvature.KFACOperator(model, loss_fn, (x, y)).inverse(d),
        "K-FAC mc": lambda d: curvature.KFACOperator(model, loss_fn, (x, y), fisher_type="mc",
                                                     generator=torch.Generator().manual_seed(0)).inverse(d),
        "K-FAC ggn, heuristic damping": lambda d: curvature.KFACOperator(model, loss_fn, (x, y)).inverse(
            d, heuristic_damping=True),
        "EK-FAC ggn": lambda d: curvature.EKFACOperator(model, loss_fn, (x, y)).inverse(d),
    }

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        """The result and the best of ``reps`` times."""
        best, out = math.inf, None
        for _ in range(reps):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return out, best

    _, grad_s = timed(lambda: torch.autograd.grad(loss_fn(model(x), y), params))
    print(f"\nGGN of the digits MLP 64-128-128-10 (tanh, float64, 1347 samples, P = {G.shape[0]}), right-hand side the "
          f"gradient; solve(G.damped(d), b, tol=1e-6) without and with preconditioner=M.inverse(d); products = "
          f"products with G; seconds: the best of {reps} (1 gradient = {grad_s * 1e3:.2f} ms), the preconditioner's "
          "factors included\n")
    print("| damping d | preconditioner | products with G | x plain CG's | converged | rel. residual | "
          "preconditioner applications | seconds (factors + eigh + solve) | x plain CG's time |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    out = []
    for d in (1e-2, 1e-3, 1e-4):
        A = G.damped(d)
        plain, plain_s = timed(lambda A=A: curvature.solve(A, b, tol=1e-6, max_iter=5000))
        print(f"| {d:g} | none (plain CG) | {plain.num_matvecs} | 1.00 | {plain.converged} | "
              f"{plain.residual_norm / float(b.norm()):.1e} | 0 | {plain_s:.3f} | 1.00 |")
        for label, make in preconditioners.items():
            res, seconds = timed(lambda A=A, d=d, make=make: curvature.solve(A, b, tol=1e-6, max_iter=5000,
                                                                             preconditioner=make(d)))
            ratio = res.num_matvecs / plain.num_matvecs
            print(f"| {d:g} | {label} | {res.num_matvecs} | {ratio:.2f} | {res.converged} | "
                  f"{res.residual_norm / float(b.norm()):.1e} | {res.num_preconditioner_applications} | "
                  f"{seconds:.3f} | {seconds / plain_s:.2f} |")
            out.append((f"d={d:g} {label}", ratio, ratio <= 1 / 3 and res.converged))
    return out


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["speed", "agree", "quality", "pcg"],
                        choices=["speed", "agree", "quality", "pcg"])
    parser.add_argument("--problems", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--slow-reps", type=int, default=5,
                        help="repetitions of the slow rows: EK-FAC 'ggn', and the transformer's K-FAC 'ggn'")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    environment_header("cpu", f"reps {args.reps} (slow rows {args.slow_reps})", f"warmup {args.warmup}",
                       f"peers: {peer_versions(PEER_DISTS)}")
    summary: list[str] = []
    if "speed" in args.parts:
        print("\n## Part 1: speed, float32, in units of one gradient")
        for name in args.problems:
            for desc, value, bound, met in run_speed(CASES[name](), args.reps, args.warmup, args.slow_reps):
                status = "met " if met else "MISS"
                summary.append(f"[{status}] [{name}] {desc}: {value:.3f} gradients (bound {bound:g})")
        print()
        print_load()
    if "agree" in args.parts:
        print("\n## Part 2: agreement with curvlinops")
        rows = run_agree()
        if rows:
            worst = max(rows, key=lambda r: r[1])
            bad = [r for r in rows if not r[2]]
            summary.append(f"[{'met ' if not bad else 'MISS'}] agreement with curvlinops where the definitions agree: "
                           f"{len(rows) - len(bad)} of {len(rows)} within 1e-6, worst {worst[1]:.1e} ({worst[0]})")
    if "quality" in args.parts:
        print("\n## Part 3: quality against the exact GGN")
        run_quality()
    if "pcg" in args.parts:
        print("\n## Part 4: K-FAC-preconditioned CG")
        rows = run_pcg(max(1, args.reps // 5))
        if rows is None:
            summary.append("[skip] preconditioned CG: curvature.solve has no preconditioner= yet")
        else:
            for desc, ratio, met in rows:
                summary.append(f"[{'met ' if met else 'MISS'}] PCG {desc}: {ratio:.2f} of plain CG's products "
                               f"(bound 0.33, converged)")
    print("\n# summary")
    for line in summary:
        print(f"  {line}")


if __name__ == "__main__":
    main()
