"""Batches as trees (curvature/_tree.py): the containers walked, the leaves kept, and batches in every container."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from helpers import rel_err
from torch import nn

import curvature
from curvature._tree import leaves, map_leaves, paired_leaves
from curvature.operators.data import _same_batches, split_batch, to_device

Pair = collections.namedtuple("Pair", "a b")


class Batch(dict):
    """A user's dict subclass, which pytree does not know."""


class Row(list):
    """A user's list subclass, which pytree does not know."""


def test_leaves_in_order_with_every_kind_of_leaf() -> None:
    t = torch.ones(2)
    tree = {"x": [t, (None, "s")], "n": np.arange(2), "p": Pair(1, 2.0), "q": collections.deque([t])}
    found = list(leaves(tree))
    assert found[0] is t and found[1:3] == [None, "s"] and found[4:6] == [1, 2.0]
    assert isinstance(found[3], np.ndarray) and isinstance(found[6], collections.deque)  # a deque is a leaf


def test_map_rebuilds_the_containers_as_batches_always_were() -> None:
    double = lambda v: 2 * v if isinstance(v, torch.Tensor) else v  # noqa: E731
    t = torch.ones(1)
    out = map_leaves(double, {"p": Pair(t, None), "b": Batch(x=Row([t])), "o": collections.OrderedDict(y=t),
                              "s": torch.Size([3]), "u": collections.UserDict(z=t)})
    assert type(out["p"]) is Pair and out["p"].b is None and torch.equal(out["p"].a, 2 * t)
    assert type(out["b"]) is dict and type(out["b"]["x"]) is Row and torch.equal(out["b"]["x"][0], 2 * t)
    assert type(out["o"]) is dict and type(out["s"]) is torch.Size  # dict subclasses become dicts, as before
    assert type(out["u"]) is collections.UserDict and out["u"]["z"] is t  # not a dict: a leaf, left as it is


def test_paired_leaves_match_keys_in_any_order_and_refuse_other_containers() -> None:
    assert list(paired_leaves({"x": 1, "y": Batch(z=[2])}, {"y": Batch(z=[3]), "x": None})) == [(1, None), (2, 3)]
    for other in ({"x": 1}, {"x": 1, "y": {"w": [2]}}, {"x": 1, "y": {"z": 2}}):
        with pytest.raises(ValueError):
            list(paired_leaves({"x": 1, "y": Batch(z=[2])}, other))


def test_same_batches_and_split_over_containers() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    x[0, 0] = float("nan")
    batch = Pair({"x": x, "ids": np.arange(3), "tag": "a"}, None)
    assert _same_batches(batch, Pair({"x": x.clone(), "ids": np.arange(3), "tag": "a"}, None))
    assert not _same_batches(batch, Pair({"x": x, "ids": np.arange(3), "tag": "b"}, None))
    assert not _same_batches(batch, Pair({"x": x[:2], "ids": np.arange(3), "tag": "a"}, None))
    ok, part = split_batch(batch, 1, 3, 3)
    assert ok and type(part) is Pair and part.a["x"].shape == (2, 2) and part.a["tag"] == "a" and part.b is None
    assert split_batch(Batch(x=x, y=[x[:2]]), 0, 1, 3) == (False, None)
    assert type(to_device(Batch(x=x), torch.device("cpu"))) is dict


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(u)) * self.b(v)


def test_operators_take_inputs_in_a_namedtuple_or_a_dict_subclass() -> None:
    """Namedtuple inputs are called as model(*x); a dict subclass as model(**x), as a plain dict is."""
    torch.manual_seed(0)
    model = TwoInputs().double()
    u, v, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2)
    y = y.double()
    loss = nn.MSELoss()
    ref = curvature.reference.hessian_matrix(model, loss, ((u, v), y))
    eye = torch.eye(ref.shape[0], dtype=torch.float64)
    named = curvature.HessianOperator(model, loss, [(Pair(u[:4], v[:4]), y[:4]), (Pair(u[4:], v[4:]), y[4:])])
    keywords = curvature.HessianOperator(model, loss, (Batch(u=u, v=v), y))
    assert rel_err(named @ eye, ref) <= 1e-10 and rel_err(keywords @ eye, ref) <= 1e-10
