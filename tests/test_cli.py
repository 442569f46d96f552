"""The ``curvature`` command, run as a user would: in a subprocess, on the built-in digits run and on user files."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import curvature
from curvature.cli import main

PNG = b"\x89PNG\r\n\x1a\n"

MODEL_PY = '''
import torch
from torch import nn


def make_model():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def make_wider():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def make_other():
    return nn.Sequential(nn.Linear(4, 3))


def not_a_module():
    return {"weight": torch.zeros(3, 4)}


def broken():
    raise RuntimeError("no GPU here")
'''

DATA_PY = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def inputs_targets():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)


def loader_with_loss():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g)
    return {"data": DataLoader(TensorDataset(x, y), batch_size=16), "loss_fn": nn.MSELoss()}


def shuffled_loader(drop_last=False):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=drop_last)
    return {"data": loader, "loss_fn": nn.MSELoss()}


def shuffled_dropping_loader():
    return shuffled_loader(drop_last=True)


def garbage():
    return "hello"


def wrong_width():
    return torch.randn(10, 5), torch.randint(0, 3, (10,))


def unreduced_loss():
    return {"data": inputs_targets(), "loss_fn": nn.CrossEntropyLoss(reduction="none")}


def unreduced_function():
    return {"data": inputs_targets(), "loss_fn": lambda outputs, targets: nn.functional.cross_entropy(
        outputs, targets, reduction="none")}
'''


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m curvature.cli ARGS`` (the console script without depending on PATH)."""
    return subprocess.run([sys.executable, "-m", "curvature.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user's files: model and data factories, checkpoints that fit and that do not, a broken file."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "user_model.py").write_text(MODEL_PY)
    (folder / "user_data.py").write_text(DATA_PY)
    (folder / "syntax_error.py").write_text("def make_model(:\n    pass\n")
    (folder / "not_a_checkpoint.pt").write_text("these are not weights\n")
    factories = runpy.run_path(str(folder / "user_model.py"))
    torch.manual_seed(123)
    torch.save(factories["make_model"]().state_dict(), folder / "model.pt")
    torch.save({"state_dict": factories["make_model"]().state_dict(), "epoch": 3}, folder / "nested.pt")
    torch.save(factories["make_other"]().state_dict(), folder / "other_keys.pt")
    torch.save(factories["make_wider"]().state_dict(), folder / "wider.pt")
    (folder / "a_file").write_text("")
    return {"dir": folder, "model": folder / "user_model.py", "data": folder / "user_data.py"}


def test_version_and_help(tmp_path: Path) -> None:
    assert ok(run_cli("--version", cwd=tmp_path)).stdout == f"curvature {curvature.__version__}\n"
    help_text = ok(run_cli("report", "--help", cwd=tmp_path)).stdout
    for option in ("--model", "--data", "--checkpoint", "--device", "--dtype", "--seed", "--metrics", "--quiet",
                   "--out", "--epochs", "file contracts"):
        assert option in help_text


def test_console_script(tmp_path: Path) -> None:
    """pyproject declares the script; where the package is installed (CI: pip install -e), the script runs."""
    from importlib import metadata

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '[project.scripts]\ncurvature = "curvature.cli:main"' in pyproject
    try:
        entry_points = metadata.distribution("curvature").entry_points
    except metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH): nothing installed to run
        return
    assert [ep.value for ep in entry_points if ep.name == "curvature"] == ["curvature.cli:main"]
    script = Path(sys.executable).parent / ("curvature.exe" if os.name == "nt" else "curvature")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"curvature {curvature.__version__}\n"


def check_default_outputs(out: Path, epochs: int) -> dict:
    assert (out / "density.png").read_bytes()[:8] == PNG
    report = json.loads((out / "report.json").read_text())
    assert report["operator"] == "hessian"
    assert report["num_params"] == 2410  # 64*32 + 32 + 32*10 + 10
    assert math.isfinite(report["lambda_max"]) and report["lambda_max"] > 0
    assert len(report["top_k"]) == 5 and report["top_k"][0] == report["lambda_max"]
    assert report["top_k"] == sorted(report["top_k"], reverse=True)
    assert math.isfinite(report["trace"]["value"]) and report["trace"]["std_error"] > 0
    assert report["frobenius_norm"]["value"] >= report["lambda_max"] * (1 - 1e-3) - 3 * report["frobenius_norm"][
        "std_error"]
    assert len(report["density"]["nodes"]) == len(report["density"]["weights"]) > 0
    assert abs(sum(report["density"]["weights"]) - 1) < 1e-6
    counts = report["num_matvecs"]
    assert all(counts[name] > 0 for name in ("eigenvalues", "trace", "frobenius_norm", "density", "total"))
    assert counts["total"] == sum(counts[name] for name in ("eigenvalues", "trace", "frobenius_norm", "density"))
    run = report["run"]
    assert run["num_samples"] == 1347 and run["num_batches"] == 1
    assert run["epochs"] == epochs and run["dtype"] == "float32" and run["device"] == "cpu" and run["seed"] == 0
    assert 0 <= run["train_accuracy"] <= 1 and 0 <= run["test_accuracy"] <= 1
    assert run["metrics"] == ["lambda_max", "top_k", "trace", "frobenius_norm", "density"]
    return report


def test_default_run_quick(tmp_path: Path) -> None:
    result = ok(run_cli("report", "--epochs", "2", "--out", "out", cwd=tmp_path))
    report = check_default_outputs(tmp_path / "out", epochs=2)
    assert report["run"]["test_accuracy"] > 0.8  # two epochs of SGD already learn the digits
    assert "Sharpness report: hessian, P = 2410" in result.stdout
    for row in ("lambda_max", "top_5", "trace", "frobenius_norm", "density", "total"):
        assert f"\n{row} " in result.stdout
    assert "wrote" in result.stdout and result.stderr == ""


def test_quiet_prints_only_the_report(tmp_path: Path) -> None:
    result = ok(run_cli("report", "--quiet", "--epochs", "0", "--metrics", "lambda_max", "--out", "out",
                        cwd=tmp_path))
    assert result.stdout.startswith("Sharpness report: hessian, P = 2410\n") and result.stderr == ""
    assert result.stdout.splitlines()[-1].startswith("total")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report) >= {"lambda_max", "run"} and "top_k" not in report and "trace" not in report
    assert not (tmp_path / "out" / "density.png").exists()  # no density asked for, no plot


@pytest.mark.slow
def test_default_run_full(tmp_path: Path) -> None:
    """``curvature report`` with no arguments: the promised run, well under a minute on 2 cores."""
    start = time.perf_counter()
    result = ok(run_cli("report", cwd=tmp_path))
    seconds = time.perf_counter() - start
    report = check_default_outputs(tmp_path / "curvature-report", epochs=30)
    assert report["run"]["test_accuracy"] > 0.95 and report["run"]["train_accuracy"] > 0.99
    assert "Sharpness report: hessian, P = 2410" in result.stdout
    assert seconds < 60, f"the default run took {seconds:.1f} s"


def test_user_model_data_checkpoint_round_trip(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "out"
    ok(run_cli("report", "--model", f"{files['model']}:make_model", "--data", f"{files['data']}:inputs_targets",
               "--checkpoint", str(files["dir"] / "model.pt"), "--dtype", "float64", "--tol", "1e-8",
               "--metrics", "lambda_max", "trace", "--out", str(out), cwd=tmp_path))
    report = json.loads((out / "report.json").read_text())

    factories = runpy.run_path(str(files["model"]))
    data = runpy.run_path(str(files["data"]))["inputs_targets"]()
    model = factories["make_model"]().double().eval()
    model.load_state_dict(torch.load(files["dir"] / "model.pt", weights_only=True))
    x, y = data[0].double(), data[1]
    H = curvature.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    expected = float(curvature.eigenvalues(H, k=1, tol=1e-8).values[0])
    dense = curvature.reference.hessian_matrix(model, nn.CrossEntropyLoss(), (x, y))
    assert report["num_params"] == 4 * 8 + 8 + 8 * 3 + 3
    assert report["lambda_max"] == pytest.approx(expected, rel=1e-6)
    assert report["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
    z = (report["trace"]["value"] - float(dense.trace())) / report["trace"]["std_error"]
    assert abs(z) < 4
    run = report["run"]
    assert run["num_samples"] == 40 and run["num_batches"] == 1 and run["loss"] == "cross_entropy"
    assert run["checkpoint"] == str(files["dir"] / "model.pt") and run["dtype"] == "float64"
    assert "train_accuracy" not in run and "epochs" not in run  # a user model is never trained
    with torch.no_grad():
        assert run["loss_value"] == pytest.approx(float(nn.CrossEntropyLoss()(model(x), y)), rel=1e-10)
    assert not (out / "density.png").exists()


def test_user_loader_with_loss_from_module(tmp_path: Path, files: dict[str, Path]) -> None:
    """The dict contract (DataLoader + loss_fn), importable module names, a nested checkpoint, the GGN."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(files["dir"]), os.environ.get("PYTHONPATH", "")])}
    result = ok(run_cli("report", "--model", "user_model:make_model", "--data", "user_data:loader_with_loss",
                        "--checkpoint", str(files["dir"] / "nested.pt"), "--operator", "ggn", "--dtype", "float64",
                        "--tol", "1e-8", "--metrics", "lambda_max,density", "--density-steps", "30", "--out", "out",
                        cwd=tmp_path, env=env))
    assert "Sharpness report: ggn" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "density.png").read_bytes()[:8] == PNG

    model = runpy.run_path(str(files["model"]))["make_model"]().double().eval()
    model.load_state_dict(torch.load(files["dir"] / "nested.pt", weights_only=True)["state_dict"])
    loader = runpy.run_path(str(files["data"]))["loader_with_loss"]()["data"]
    x, y = (torch.cat(parts).double() for parts in zip(*loader))
    dense = curvature.reference.ggn(model, nn.MSELoss(), (x, y))
    assert report["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
    run = report["run"]
    assert run["num_samples"] == 50 and run["num_batches"] == 4 and "MSELoss" in run["loss"]
    assert run["operator"] == "ggn"


@pytest.mark.parametrize("operator", ["kfac", "ekfac"])
def test_kronecker_factored_operators_are_offered_and_titled(tmp_path: Path, files: dict[str, Path],
                                                             operator: str) -> None:
    """``--operator kfac``/``ekfac``: λ_max is the largest eigenvalue of the blocks, and the density plot is drawn
    under the operator's title."""
    out = tmp_path / "out"
    model_file, data_file = f"{files['model']}:make_model", f"{files['data']}:inputs_targets"
    result = ok(run_cli("report", "--model", model_file, "--data", data_file,
                        "--checkpoint", str(files["dir"] / "model.pt"), "--dtype", "float64", "--tol", "1e-10",
                        "--operator", operator, "--metrics", "lambda_max,density", "--density-steps", "20",
                        "--out", str(out), cwd=tmp_path))
    assert f"Sharpness report: {operator}" in result.stdout
    assert (out / "density.png").read_bytes()[:8] == PNG
    report = json.loads((out / "report.json").read_text())
    model = runpy.run_path(str(files["model"]))["make_model"]().double().eval()
    model.load_state_dict(torch.load(files["dir"] / "model.pt", weights_only=True))
    x, y = runpy.run_path(str(files["data"]))["inputs_targets"]()
    op = curvature.operators.operator_class(operator)(model, nn.CrossEntropyLoss(), (x.double(), y))
    assert report["lambda_max"] == pytest.approx(max(float(b.eigenvalues.max()) for b in op.eigh()), rel=1e-8)
    assert report["run"]["operator"] == operator


# Each bad argument: (arguments, a piece of the one-line message). {dir}, {model}, {data} are the files above.
ERRORS = {
    "model_file_missing": (["--model", "{dir}/nope.py:make_model", "--data", "{data}:inputs_targets"],
                           "no such file"),
    "model_module_missing": (["--model", "no_such_module_xyz:make_model", "--data", "{data}:inputs_targets"],
                             "neither a file nor an importable module"),
    "factory_missing": (["--model", "{model}:nothing", "--data", "{data}:inputs_targets"], "has no 'nothing'"),
    "factory_not_named": (["--model", "{model}", "--data", "{data}:inputs_targets"], "names no factory"),
    "factory_not_module": (["--model", "{model}:not_a_module", "--data", "{data}:inputs_targets"],
                           "returned a dict, not a torch.nn.Module"),
    "factory_raises": (["--model", "{model}:broken", "--data", "{data}:inputs_targets"],
                       "raised RuntimeError: no GPU here"),
    "model_syntax_error": (["--model", "{dir}/syntax_error.py:make_model", "--data", "{data}:inputs_targets"],
                           "SyntaxError"),
    "checkpoint_wrong_keys": (["--model", "{model}:make_model", "--data", "{data}:inputs_targets", "--checkpoint",
                               "{dir}/other_keys.pt"], "missing keys 2.weight, 2.bias"),
    "checkpoint_wrong_shapes": (["--model", "{model}:make_model", "--data", "{data}:inputs_targets",
                                 "--checkpoint", "{dir}/wider.pt"], "shapes differ (checkpoint vs model) for 0.weight"),
    "checkpoint_not_weights": (["--checkpoint", "{dir}/not_a_checkpoint.pt"], "cannot read"),
    "checkpoint_missing": (["--checkpoint", "{dir}/nope.pt"], "no such file"),
    "builtin_checkpoint_wrong_keys": (["--checkpoint", "{dir}/model.pt"], "does not fit the model"),
    "unknown_metric": (["--metrics", "lambda_max,sharpness"], "unknown metric 'sharpness'"),
    "bad_dtype": (["--dtype", "float16"], "invalid choice: 'float16'"),
    "bad_device": (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    "bad_count": (["--top-k", "0"], "must be at least 1"),
    "model_without_data": (["--model", "{model}:make_model"], "--model needs --data"),
    "data_without_model": (["--data", "{data}:inputs_targets"], "--data needs --model"),
    "epochs_with_model": (["--model", "{model}:make_model", "--data", "{data}:inputs_targets", "--epochs", "3"],
                          "--epochs trains the built-in model only"),
    "data_garbage": (["--model", "{model}:make_model", "--data", "{data}:garbage"], "returned a str"),
    "data_does_not_fit": (["--model", "{model}:make_model", "--data", "{data}:wrong_width"],
                          "the data does not fit the model"),
    "loss_does_not_fit": (["--model", "{model}:make_model", "--data", "{data}:inputs_targets", "--loss", "mse"],
                          "the loss does not fit"),
    "out_is_a_file": (["--out", "{dir}/a_file"], "exists and is not a directory"),
    "unknown_option": (["--lambda"], "unrecognized arguments: --lambda"),
    "block_malformed": (["--block", "hidden"], "--block expects NAME=SEL[,SEL...] (parameter or module names), got "
                                               "'hidden'"),
    "block_twice": (["--block", "a=0", "--block", "a=2"], "--block names the block 'a' twice"),
    "per_layer_and_block": (["--per-layer", "--block", "a=0"], "--per-layer and --block both choose the blocks"),
    "per_layer_without_its_metrics": (["--per-layer", "--metrics", "density"],
                                      "--per-layer measures lambda_max and the trace of each block, and --metrics "
                                      "asks for neither"),
}
if not torch.cuda.is_available():
    ERRORS["cuda_unavailable"] = (["--device", "cuda"], "CUDA is not available")


@pytest.fixture(scope="module")
def error_runs(files: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:
    """Every bad-argument case at once, four processes at a time (each pays for importing torch)."""
    names = {"dir": files["dir"], "model": files["model"], "data": files["data"]}

    def run(case: str) -> subprocess.CompletedProcess:
        args = [arg.format(**names) for arg in ERRORS[case][0]]
        return run_cli("report", *args, cwd=files["dir"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(ERRORS, pool.map(run, ERRORS)))


def check_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("curvature: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_arguments_exit_2_with_one_line(case: str, error_runs: dict[str, subprocess.CompletedProcess]) -> None:
    check_one_line_error(error_runs[case], ERRORS[case][1])


def test_no_command_is_an_error(tmp_path: Path) -> None:
    check_one_line_error(run_cli(cwd=tmp_path), "choose a command")
    assert not any(tmp_path.iterdir())  # a failed run leaves no empty output directory behind


def test_main_in_process(capsys: pytest.CaptureFixture) -> None:
    """main() returns the status instead of exiting, for use from Python."""
    assert main(["report", "--dtype", "float16"]) == 2
    assert capsys.readouterr().err.startswith("curvature: error: argument --dtype: invalid choice: 'float16'")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"curvature {curvature.__version__}\n"


def test_docs_page_names_every_option(capsys: pytest.CaptureFixture) -> None:
    assert main(["report", "--help"]) == 0
    options = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out))
    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = sorted(option for option in options if f"`{option}" not in page)
    assert not missing, f"docs/cli.md does not describe {missing}"


@pytest.mark.slow
def test_docs_example_runs(tmp_path: Path) -> None:
    """The three files of docs/cli.md's complete example, written out and run as the page says."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    blocks = re.findall(r"```python\n# (\w+\.py)(.*?)```", page, flags=re.S)
    assert [name for name, _ in blocks] == ["net.py", "data.py", "train.py"]
    for name, body in blocks:
        (tmp_path / name).write_text(f"# {name}{body}")
    result = subprocess.run([sys.executable, "train.py"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    result = ok(run_cli("report", "--model", "net.py:make_model", "--data", "data.py:make_data", "--checkpoint",
                        "net.pt", "--out", "net-report", cwd=tmp_path))
    assert "Sharpness report: hessian, P = 5210" in result.stdout
    report = json.loads((tmp_path / "net-report" / "report.json").read_text())
    assert report["run"]["num_samples"] == 1797 and report["run"]["num_batches"] == 4
    assert (tmp_path / "net-report" / "density.png").read_bytes()[:8] == PNG


# -- errors found before any work: --out, non-finite checkpoints, unreduced losses --------------------------


def one_line_error_before_any_work(capsys: pytest.CaptureFixture, argv: list[str], *fragments: str) -> str:
    """Run ``main(argv)`` in this process: status 2, one line naming every fragment, nothing printed before it."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # not even the "model: ..." line that starts the work
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvature: error: "), captured.err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


OUT_PLACES = ["under_a_dangling_link"] + (["under_proc"] if Path("/proc/self").is_dir() else [])


@pytest.mark.parametrize("place", OUT_PLACES)
def test_an_out_directory_that_cannot_be_created_is_refused_before_any_work(
    place: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Permission bits cannot tell (os.access says yes to root for /proc): creating the directory does, for anyone."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    out = link / "report" if place == "under_a_dangling_link" else Path("/proc/curvature-report/out")
    one_line_error_before_any_work(
        capsys, ["report", "--epochs", "0", "--metrics", "lambda_max", "--out", str(out)], f"--out {out}: cannot"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"] and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("builtin", [False, True], ids=["user-model", "built-in"])
def test_a_checkpoint_with_nan_or_inf_names_the_tensor_before_any_work(
    builtin: bool, tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    if builtin:
        state = curvature.cli._builtin_model().state_dict()
        state["0.weight"][3, :2] = float("inf")
        source, key, count = [], "0.weight", "2 of its 2048 entries"
    else:
        state = runpy.run_path(str(files["model"]))["make_model"]().state_dict()
        state["2.bias"][1] = float("nan")
        source = ["--model", f"{files['model']}:make_model", "--data", f"{files['data']}:inputs_targets"]
        key, count = "2.bias", "1 of its 3 entries"
    torch.save(state, tmp_path / "diverged.pt")
    out = tmp_path / "new" / "deeper"
    one_line_error_before_any_work(
        capsys, ["report", *source, "--checkpoint", str(tmp_path / "diverged.pt"), "--out", str(out)],
        "--checkpoint", f"{key} holds NaN or Inf in {count}",
    )
    assert not (tmp_path / "new").exists()  # the check of --out removed the directories it created


@pytest.mark.parametrize("factory, fragment", [
    ("unreduced_loss", "--data: the loss_fn of"),  # nn.CrossEntropyLoss(reduction='none'): refused up front
    ("unreduced_function", "the loss returned a tensor of shape (40,) on batch 0, not a scalar"),  # by the data check
])
def test_a_loss_with_reduction_none_gets_the_operators_message(
    factory: str, fragment: str, tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    one_line_error_before_any_work(
        capsys,
        ["report", "--model", f"{files['model']}:make_model", "--data", f"{files['data']}:{factory}", "--quiet",
         "--out", str(tmp_path / "out")],
        fragment, "the loss must reduce the batch to a scalar with reduction 'mean' or 'sum'",
    )
    assert not (tmp_path / "out").exists()


def test_a_shuffled_loader_is_measured_and_one_dropping_samples_refused(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """The CLI converts batches on the fly; the operators still read the loader's sampler through the wrapper: a
    random order is fine (a sum over all batches), a dropped remainder that changes with every pass is not."""
    argv = ["report", "--model", f"{files['model']}:make_model", "--metrics", "lambda_max", "--quiet"]
    assert main([*argv, "--data", f"{files['data']}:shuffled_loader", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main([*argv, "--data", f"{files['data']}:shuffled_dropping_loader", "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err
    assert "shuffling DataLoader with drop_last=True" in error and "shuffle=False" in error


# -- the per-layer table: --per-layer and --block ------------------------------------------------------------


def user_model_and_data(files: dict[str, Path]) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The user files' model with the weights of model.pt, and its data, in float64."""
    model = runpy.run_path(str(files["model"]))["make_model"]().double().eval()
    model.load_state_dict(torch.load(files["dir"] / "model.pt", weights_only=True))
    x, y = runpy.run_path(str(files["data"]))["inputs_targets"]()
    return model, (x.double(), y)


@pytest.mark.parametrize("option", [["--per-layer"], ["--block", "hidden=0", "--block", "out=2.weight,2.bias",
                                                       "--block", "all=0,2."]])
def test_per_layer_table_matches_the_dense_blocks(option: list[str], tmp_path: Path, files: dict[str, Path],
                                                  capsys: pytest.CaptureFixture) -> None:
    """Each row of the table, on the console and in report.json, is the dense Hessian's diagonal block."""
    out = tmp_path / "out"
    assert main(["report", "--model", f"{files['model']}:make_model", "--data", f"{files['data']}:inputs_targets",
                 "--checkpoint", str(files["dir"] / "model.pt"), "--dtype", "float64", "--tol", "1e-8",
                 "--metrics", "lambda_max,trace", "--quiet", "--out", str(out), *option]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    names = ["0", "2"] if option == ["--per-layer"] else ["hidden", "out", "all"]
    params = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "hidden": ["0.weight", "0.bias"],
              "out": ["2.weight", "2.bias"], "all": ["0.weight", "0.bias", "2.weight", "2.bias"]}
    assert [row["name"] for row in report["blocks"]] == names
    assert report["run"]["blocks"] == ("modules" if option == ["--per-layer"] else
                                       {"hidden": ["0"], "out": ["2.weight", "2.bias"], "all": ["0", "2."]})
    assert "\nPer block: the Hessian in each block's parameters alone" in stdout
    table = stdout.split("Per block")[1].splitlines()[3:]
    assert [line.split()[0] for line in table] == [*names, "total"]

    model, data = user_model_and_data(files)
    dense = curvature.reference.hessian_matrix(model, nn.CrossEntropyLoss(), data)
    sizes = {"0.weight": 32, "0.bias": 8, "2.weight": 24, "2.bias": 3}
    starts = dict(zip(sizes, [0, 32, 40, 64]))
    for row in report["blocks"]:
        assert row["params"] == params[row["name"]]
        index = torch.cat([torch.arange(starts[n], starts[n] + sizes[n]) for n in row["params"]])
        block = dense[index][:, index]
        assert row["num_params"] == index.numel() and row["converged"]
        assert row["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)
        assert row["trace"]["std_error"] == 0 and row["trace"]["num_matvecs"] == index.numel()  # at most 100
        assert row["trace"]["value"] == pytest.approx(float(block.trace()), rel=1e-10)
    counts = report["num_matvecs"]
    assert counts["blocks"] == sum(row["num_matvecs"] for row in report["blocks"])
    assert counts["total"] == counts["eigenvalues"] + counts["trace"] + counts["blocks"]


@pytest.mark.parametrize("option, fragment", [
    (["--block", "enc=encoder"], "--block: blocks['enc'] names 'encoder', which is neither a parameter nor a module "
                                 "of the model; its modules with parameters are ['0', '2']"),
    (["--block", "act=1"], "--block: blocks['act'] names the module '1' (Tanh), which has no parameters"),
])
def test_a_block_the_model_lacks_is_refused_before_any_work(option: list[str], fragment: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """On the built-in model: refused before training, with sharpness's message under the option's name."""
    one_line_error_before_any_work(capsys, ["report", *option, "--out", str(tmp_path / "out")], fragment)
    assert not (tmp_path / "out").exists()
