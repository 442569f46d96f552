"""Hessian-aware channel pruning of a small CNN on real data, against Optimal Brain Damage/Surgeon and magnitude.

A CNN with three 3x3 conv layers (16, 32, 32 channels), global average pooling and a linear classifier is
trained on scikit-learn's digits (8x8 images; 1347 training, 450 test), then 30%, 50% and 70% of the conv
channels are pruned by ``curvature.pruning.prune`` (``torch.nn.utils.prune`` masks; the classifier is left
out of the scores and stays whole) with scores from ``curvature.pruning.sensitivity``:

* HAP: relative Hessian trace of each channel times its squared norm (Yu et al. 2022), traces from 30
  Hutchinson probes of the Hessian on 512 training images;
* OBD: ½ H_jj w_j² summed over the channel (LeCun et al. 1990), from the same number of probes;
* OBS-KFAC: Optimal Brain Surgeon with the damped K-FAC of the conv layers on the same images, ½ w_Sᵀ
  ([B⁻¹]_SS)⁻¹ w_S per channel (Wang et al. 2019's Kronecker-factored OBS), without and with the OBS update of
  the remaining weights of each layer (``prune(..., compensate=True)``);
* magnitude: the L1 norm of each filter (Li et al. 2017), ranked globally; the same ranked per layer; and
  the mean |w| of each filter (the L1 norm over the filter size) ranked globally.

Prints the test accuracy right after pruning and after a short fine-tuning (2 epochs of Adam at lr 1e-3,
the masks in place), averaged over seeds, and the Hessian-vector products spent.

Run:  python examples/prune_cnn.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _digits import load_data  # examples/_digits.py: the script's own directory is on sys.path
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvature.pruning import prune, sensitivity

AMOUNTS = (0.3, 0.5, 0.7)
CONV = ["0", "2", "4"]


def make_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model: a second thread costs more than it saves
    X, X_test, y, y_test = load_data(torch.float32)
    X, X_test = X.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8)
    seeds = [0] if args.quick else [0, 1, 2]
    loss_fn = nn.CrossEntropyLoss()
    rows: dict[str, dict[float, list[tuple[float, float]]]] = {}
    base, products, seconds, obs_seconds = [], {}, [], []
    start = time.perf_counter()
    for seed in seeds:
        model = make_cnn(seed)
        train(model, X, y, epochs=15, lr=1e-2, seed=seed)
        base.append(accuracy(model, X_test, y_test))
        hessian_data = (X[:512], y[:512])
        tick = time.perf_counter()
        hap = sensitivity(model, loss_fn, hessian_data, "hap", "channel", num_matvecs=30,
                          generator=torch.Generator().manual_seed(seed), layers=CONV)
        seconds.append(time.perf_counter() - tick)
        obd = sensitivity(model, loss_fn, hessian_data, "obd", "channel", num_matvecs=30,
                          generator=torch.Generator().manual_seed(seed), layers=CONV)
        tick = time.perf_counter()
        obs = sensitivity(model, loss_fn, hessian_data, "obs_kfac", "channel", layers=CONV)
        obs_seconds.append(time.perf_counter() - tick)
        magnitude = sensitivity(model, loss_fn, hessian_data, "magnitude", "channel", layers=CONV)
        sizes = {name: model.get_submodule(name[: -len(".weight")]).weight[0].numel() for name in magnitude}
        mean_magnitude = {name: score / sizes[name] for name, score in magnitude.items()}
        products["HAP"], products["OBD"] = hap.num_matvecs, obd.num_matvecs
        methods = {
            "HAP (global)": (hap, "global"),
            "OBD (global)": (obd, "global"),
            "OBS-KFAC (global)": (obs, "global"),
            "OBS-KFAC + update (global)": (obs, "global", True),
            "magnitude L1 (global)": (magnitude, "global"),
            "magnitude L1 (per layer)": (magnitude, "layer"),
            "magnitude mean|w| (global)": (mean_magnitude, "global"),
        }
        for name, (scores, scope, *update) in methods.items():
            for amount in AMOUNTS:
                pruned = copy.deepcopy(model)
                prune(pruned, scores, amount, scope=scope, compensate=bool(update))
                before = accuracy(pruned, X_test, y_test)
                train(pruned, X, y, epochs=2, lr=1e-3, seed=100 + seed)
                rows.setdefault(name, {}).setdefault(amount, []).append((before, accuracy(pruned, X_test, y_test)))
    print(f"digits CNN 16-32-32 conv channels; seeds {seeds}; unpruned test accuracy "
          f"{statistics.mean(base):.3f} (per seed {', '.join(f'{b:.3f}' for b in base)})")
    print(f"Hessian-vector products per sensitivity: HAP {products['HAP']}, OBD {products['OBD']} (on 512 images); "
          f"HAP took {statistics.mean(seconds):.1f} s, OBS-KFAC (no products: one pass) "
          f"{statistics.mean(obs_seconds):.1f} s")
    print("\ntest accuracy after pruning the conv channels globally or per layer: no fine-tuning / 2 epochs of "
          "fine-tuning (mean over seeds)")
    header = f"{'method':28s}" + "".join(f"{f'{int(100 * a)}% channels':>22s}" for a in AMOUNTS)
    print(header)
    print("-" * len(header))
    for name, by_amount in rows.items():
        cells = []
        for amount in AMOUNTS:
            values = by_amount[amount]
            cells.append(f"{statistics.mean(v[0] for v in values):.3f} / {statistics.mean(v[1] for v in values):.3f}")
        print(f"{name:28s}" + "".join(f"{c:>22s}" for c in cells))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
