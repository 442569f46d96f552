"""Per-sample quantities (issue 18): curvature against BackPACK's BatchGrad, BatchL2Grad, DiagGGNExact, DiagGGNMC.

On the digits MLP and CNN of ``benchmarks/kronecker.py`` (float32, cross-entropy mean, the 1347-sample training split
of ``curvature.cli.digits.load_split`` as one batch, or its first ``--batch`` samples), side by side in one process:

=================  ====================================================  ==============================================
quantity           curvature                                             BackPACK 1.7 (forward + ``backward()`` inside
                                                                         ``with backpack(...)``, extended deep copy)
=================  ====================================================  ==============================================
BatchGrad          ``per_sample_gradients(model, loss, data).stack()``   ``BatchGrad()``: ``p.grad_batch``
BatchL2Grad        ``gradient_norms(model, loss, data)``                 ``BatchL2Grad()``: ``p.batch_l2``
DiagGGNExact       ``G.diagonal()``, ``G = GGNOperator(...)``            ``DiagGGNExact()``: ``p.diag_ggn_exact``
DiagGGNMC          ``F.diagonal()``, ``F = FisherOperator(...,           ``DiagGGNMC(mc_samples=1)``: ``p.diag_ggn_mc``
                   mc_samples=1)``
=================  ====================================================  ==============================================

The operators' rows are timed on an operator built once (what a user holds), and the build alone is a row of its own
(it validates the model and the first batch), so "build + diagonal" is the sum of the two. ``per_sample_gradients``
and ``gradient_norms`` build their operator inside the call: their rows include it. Every table has the gradient
(forward + ``torch.autograd.grad`` of the same loss on the same data) as its first row and unit.

Agreement (untimed, once, before the timing): BackPACK scales by the mean loss's ``1/N``, ours returns each sample's
gradient of its summed loss (``PerSample.normalizer`` ``W = N``), so ``grad_batch = ours / W``, ``sqrt(sum batch_l2) =
ours / W``; the exact diagonals are the same quantity. The script prints ``max|a - b| / max|b|`` for these; for the
Monte-Carlo diagonals (different draws) the shapes, the ratio of the norms and each one's relative distance to the
exact diagonal.

The same curvature quantities are timed on the GPT of ``benchmarks/_transformer.py`` (kronecker.py's
``transformer_case``: 2 blocks, d 32, 4 heads, vocab 32, 64 sequences of 16 tokens, all 28 032 parameters). BackPACK
is tried there too and what it does is printed (its first-order extensions run but skip some parameters; its
second-order ones raise); its first-order times are shown as ``info``, not as a comparison.

Timing method (``_harness.round_robin``): after ``--warmup`` rounds, each of ``--reps`` repetitions runs every row of a
section once, led by an untimed call of the gradient row; medians, quartiles, minima, ratios to the section's
gradient, and ours / BackPACK's medians against the issue's goal of at most 1.0. The GPT's exact diagonal (one
pullback per position and class, 512 per sequence) is a section of its own with ``--slow-reps``.

Run (BackPACK is optional; its rows are skipped with a note where it is not importable):

    PYTHONPATH=$PWD .venv-peers/bin/python benchmarks/per_sample.py     # --threads 1 --reps 10 --warmup 2, ~2 min

One torch thread, as in kronecker.py (other processes share this 2-core machine). See benchmarks/README.md, "Issue 18".
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import copy  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import torch  # noqa: E402
from _harness import environment_header, peer_versions, print_load, round_robin  # noqa: E402
from kronecker import GRAD, Case, Section, cnn_case, mlp_case, print_section, transformer_case  # noqa: E402

import curvature  # noqa: E402

warnings.filterwarnings("ignore", message=r"Full backward hook is firing")  # BackPACK's hooks, inputs without grad
warnings.filterwarnings("ignore", message=r".*Extension saving to .* does not have an extension")

try:
    import backpack
    import backpack.extensions
except ImportError:  # the project's own venv has no peers
    backpack = None

PEER_DISTS = {"backpack-for-pytorch": backpack}
SLOW = "exact diagonal (slow)"
GOAL = 1.0  # ours / BackPACK, medians (issue 18)
# (quantity, our row, BackPACK's row): the pairs compared against GOAL
PAIRS = [
    ("BatchGrad", "ours per_sample_gradients(...).stack()", "BackPACK BatchGrad"),
    ("BatchL2Grad", "ours gradient_norms(...)", "BackPACK BatchL2Grad"),
    ("DiagGGNExact", "ours G.diagonal() (G built)", "BackPACK DiagGGNExact"),
    ("DiagGGNMC", "ours F.diagonal(), mc_samples=1 (F built)", "BackPACK DiagGGNMC(mc_samples=1)"),
]
BUILD = {"DiagGGNExact": "ours GGNOperator(...) build", "DiagGGNMC": "ours FisherOperator(mc_samples=1) build"}


# -- problems --------------------------------------------------------------------------------------------------------
def with_batch(case: Case, batch: Optional[int]) -> Case:
    """The case on its first ``batch`` samples (None: all of them)."""
    if batch is None or batch >= case.x.shape[0]:
        return case
    return Case(case.name, case.model, case.loss_fn, case.x[:batch], case.y[:batch], case.names, case.note,
                case.backpack, case.ekfac_peer)


def all_params(case: Case) -> list[torch.Tensor]:
    """Every trainable parameter: what ours differentiates with ``params=None``."""
    return [p for p in case.model.parameters() if p.requires_grad]


def gradient(case: Case) -> None:
    torch.autograd.grad(case.loss_fn(case.model(case.x), case.y), all_params(case))


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def ggn(case: Case) -> curvature.GGNOperator:
    return curvature.GGNOperator(case.model, case.loss_fn, (case.x, case.y))


def mc_fisher(case: Case) -> curvature.FisherOperator:
    return curvature.FisherOperator(case.model, case.loss_fn, (case.x, case.y), mc_samples=1, generator=generator())


# -- BackPACK --------------------------------------------------------------------------------------------------------
def extensions() -> dict[str, Callable[[], Any]]:
    ext = backpack.extensions
    return {"BatchGrad": ext.BatchGrad, "BatchL2Grad": ext.BatchL2Grad, "DiagGGNExact": ext.DiagGGNExact,
            "DiagGGNMC": lambda: ext.DiagGGNMC(mc_samples=1)}


SAVED = {"BatchGrad": "grad_batch", "BatchL2Grad": "batch_l2", "DiagGGNExact": "diag_ggn_exact",
         "DiagGGNMC": "diag_ggn_mc"}


class BackPACK:
    """An extended deep copy of the case's model and loss, and one forward + backward inside an extension."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.model = backpack.extend(copy.deepcopy(case.model))
        self.loss_fn = backpack.extend(copy.deepcopy(case.loss_fn))

    def prepare(self, _: int = 0) -> tuple:
        """Untimed set-up: no ``.grad`` to accumulate into (``backward()`` fills them) and a fixed RNG for MC."""
        self.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        return ()

    def step(self, extension: Any) -> None:
        with backpack.backpack(extension):
            self.loss_fn(self.model(self.case.x), self.case.y).backward()

    def run(self, name: str) -> dict[str, Optional[torch.Tensor]]:
        """One untimed call: what the extension saved on every parameter (None where it saved nothing)."""
        self.prepare()
        self.step(extensions()[name]())
        return {n: getattr(p, SAVED[name], None) for n, p in self.model.named_parameters()}


# -- agreement -------------------------------------------------------------------------------------------------------
def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return float((a - b).abs().max() / b.abs().max())


def flat(saved: dict[str, Optional[torch.Tensor]], samples: Optional[int] = None) -> torch.Tensor:
    parts = [t.reshape(samples, -1) if samples else t.reshape(-1) for t in saved.values()]
    return torch.cat(parts, dim=1 if samples else 0)


def agreement(case: Case) -> list[str]:
    """Ours against BackPACK on the MLP and CNN (float32): max relative differences, MC magnitudes."""
    n = case.x.shape[0]
    data = (case.x, case.y)
    stream = curvature.per_sample_gradients(case.model, case.loss_fn, data)
    grads = stream.stack()
    W = stream.normalizer
    norms = curvature.gradient_norms(case.model, case.loss_fn, data)
    exact = ggn(case).diagonal()
    mc = mc_fisher(case).diagonal()
    bp = BackPACK(case)
    l2 = torch.stack(list(bp.run("BatchL2Grad").values())).sum(0).sqrt()
    lines = [
        f"BatchGrad: max|ours/W - grad_batch| / max|grad_batch| = "
        f"{max_rel(grads / W, flat(bp.run('BatchGrad'), n)):.1e} (W = {W:g}; (N, P) = {tuple(grads.shape)})",
        f"BatchL2Grad: max|ours/W - sqrt(sum batch_l2)| / max = {max_rel(norms / W, l2):.1e}",
        f"DiagGGNExact: max|ours - diag_ggn_exact| / max|diag_ggn_exact| = "
        f"{max_rel(exact, flat(bp.run('DiagGGNExact'))):.1e}",
    ]
    theirs = flat(bp.run("DiagGGNMC"))
    dist = lambda d: float((d - exact).norm() / exact.norm())  # noqa: E731
    lines.append(f"DiagGGNMC (1 draw, different draws): shapes {tuple(mc.shape)} / {tuple(theirs.shape)}, "
                 f"||ours|| / ||BackPACK|| = {float(mc.norm() / theirs.norm()):.3f}, sum ours / BackPACK = "
                 f"{float(mc.sum() / theirs.sum()):.3f}, ||MC - exact|| / ||exact||: ours {dist(mc):.3f}, "
                 f"BackPACK {dist(theirs):.3f}")
    return lines


def backpack_on_transformer(case: Case) -> tuple[list[str], set[str]]:
    """What each BackPACK extension does on the GPT: the error it raises, or what it saved and how well.

    Returns the lines to print and the extensions that ran (their times are shown as info).
    """
    lines, ran = [], set()
    ours: Optional[torch.Tensor] = None
    W = 1.0
    for name in SAVED:
        try:
            saved = BackPACK(case).run(name)
        except Exception as err:  # noqa: BLE001 -- what BackPACK raises is the finding
            lines.append(f"BackPACK {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        ran.add(name)
        missing = [k for k, v in saved.items() if v is None]
        n = case.x.shape[0]
        wrong = [f"{k} {tuple(v.shape)}" for k, v in saved.items() if v is not None and v.shape[0] != n]
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        note = (f"runs, but saves nothing for {len(missing)} of {len(saved)} parameter tensors ({listed}) and a "
                f"leading dimension other than the {n} samples for "
                f"{', '.join(wrong) or 'none'}")
        if name == "BatchGrad":
            if ours is None:
                stream = curvature.per_sample_gradients(case.model, case.loss_fn, (case.x, case.y))
                ours, W = stream.stack(), stream.normalizer
            offsets, start = {}, 0
            for k, p in case.model.named_parameters():
                offsets[k] = (start, start + p.numel())
                start += p.numel()
            good = [k for k, v in saved.items() if v is not None and v.shape[0] == n]
            mine = torch.cat([ours[:, slice(*offsets[k])] for k in good], dim=1) / W
            note += (f"; on the {len(good)} others, max|ours/W - grad_batch| / max = "
                     f"{max_rel(mine, torch.cat([saved[k].reshape(n, -1) for k in good], dim=1)):.1e}")
        lines.append(f"BackPACK {name}: {note}")
    return lines, ran


# -- timing ----------------------------------------------------------------------------------------------------------
def sections(case: Case, peer_ran: set[str], slow_exact: bool) -> list[Section]:
    """The timed rows of a problem: first-order, diagonals, and (where ``slow_exact``) the exact diagonal alone."""
    data = (case.x, case.y)
    first, diag, slow = Section("first-order"), Section("diagonals"), Section(SLOW)
    for section in (first, diag, slow):
        section.add(GRAD, lambda: gradient(case))
    first.add(PAIRS[0][1], lambda: curvature.per_sample_gradients(case.model, case.loss_fn, data).stack())
    first.add(PAIRS[1][1], lambda: curvature.gradient_norms(case.model, case.loss_fn, data))
    G, F = ggn(case), mc_fisher(case)
    diag.add(BUILD["DiagGGNExact"], lambda: ggn(case))
    diag.add(BUILD["DiagGGNMC"], lambda: mc_fisher(case))
    (slow if slow_exact else diag).add(PAIRS[2][1], G.diagonal)
    diag.add(PAIRS[3][1], F.diagonal)
    if backpack is not None:
        for quantity, _, label in PAIRS:
            if quantity not in peer_ran:
                continue
            bp = BackPACK(case)
            ext = extensions()[quantity]
            (first if quantity.startswith("Batch") else diag).add(
                label if case.backpack else f"{label} (incomplete, see above)",
                lambda bp=bp, ext=ext: bp.step(ext()), bp.prepare)
    return [section for section in (first, diag, slow) if len(section.rows) > 1]


def run_problem(case: Case, reps: int, warmup: int, slow_reps: int) -> list[tuple[str, float, bool]]:
    n = case.x.shape[0]
    print(f"\n### {case.name}: P = {sum(p.numel() for p in all_params(case))}, N = {n}\n")
    peer_ran: set[str] = set()
    if backpack is None:
        print("note: BackPACK is not importable: its rows and the agreement are skipped.")
    elif case.backpack:
        peer_ran = set(SAVED)
        print("agreement with BackPACK (float32, untimed):\n")
        for line in agreement(case):
            print(f"* {line}")
    else:
        print("BackPACK on this model (untimed):\n")
        lines, peer_ran = backpack_on_transformer(case)
        for line in lines:
            print(f"* {line}")
    medians: dict[str, float] = {}
    for section in sections(case, peer_ran, slow_exact=not case.backpack):
        slow = section.name == SLOW
        if slow:
            print(f"\n({slow_reps} repetitions of the next section, no warm-up: a call takes seconds)")
        round_robin(section.rows, slow_reps if slow else reps, 0 if slow else warmup, lead_in=True)
        medians.update({label: st.median for label, st in print_section(section).items()})
        print()
        print_load()
    out = []
    if not case.backpack or backpack is None:
        return out
    print("\nours / BackPACK (medians; goal: at most 1.0):")
    for quantity, mine, theirs in PAIRS:
        ratio = medians[mine] / medians[theirs]
        status = "met " if ratio <= GOAL else "MISS"
        line = f"{quantity}: {ratio:.2f}"
        if quantity in BUILD:
            line += f" (build + diagonal: {(medians[mine] + medians[BUILD[quantity]]) / medians[theirs]:.2f})"
        print(f"  [{status}] {line}")
        out.append((quantity, ratio, ratio <= GOAL))
    return out


CASES = {"mlp": mlp_case, "cnn": cnn_case, "transformer": transformer_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=None,
                        help="samples of the digits split (default: all 1347); the GPT keeps its 64 sequences")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--slow-reps", type=int, default=2, help="repetitions of the GPT's exact diagonal")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    environment_header("cpu", "float32", f"reps {args.reps} (GPT exact diagonal {args.slow_reps})",
                       f"warmup {args.warmup}", f"batch {args.batch or 'all'}",
                       f"chunk_size default ({curvature.operators.per_sample.CHUNK_BYTES // 2**20} MiB of pullbacks)",
                       f"peers: {peer_versions(PEER_DISTS)}")
    summary = []
    for name in args.problems:
        case = CASES[name]() if name == "transformer" else with_batch(CASES[name](), args.batch)
        for quantity, ratio, met in run_problem(case, args.reps, args.warmup, args.slow_reps):
            summary.append(f"[{'met ' if met else 'MISS'}] [{name}] {quantity}: ours / BackPACK {ratio:.2f} "
                           f"(goal {GOAL:g})")
    print("\n# summary")
    for line in summary:
        print(f"  {line}")
    print_load()


if __name__ == "__main__":
    main()
