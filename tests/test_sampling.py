"""Probe vectors: distributions, reproducibility, and the untouched global random stream."""

from __future__ import annotations

import pytest
import torch

from curvature import sampling


def test_rademacher_and_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    signs = sampling.rademacher((1000, 3), g, torch.float32)
    assert signs.dtype == torch.float32 and set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 0.1
    normal = sampling.gaussian(20000, g)
    assert abs(float(normal.mean())) < 0.05 and abs(float(normal.std()) - 1) < 0.05


def test_same_seed_same_probes_in_both_dtypes() -> None:
    a = sampling.probes("gaussian", (50, 2), torch.Generator().manual_seed(1), torch.float64)
    b = sampling.probes("gaussian", (50, 2), torch.Generator().manual_seed(1), torch.float32)
    assert torch.equal(a.float(), b)


def test_resolve_generator_leaves_the_global_stream() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    g = sampling.resolve_generator(None)
    drawn = torch.randn(5, generator=g)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(drawn, torch.randn(5))  # the copy starts where the global stream stands
    own = torch.Generator()
    assert sampling.resolve_generator(own) is own


def test_errors() -> None:
    with pytest.raises(ValueError, match="distribution must be one of"):
        sampling.probes("sphere", 3)
    with pytest.raises(TypeError, match="torch.Generator"):
        sampling.rademacher(3, generator=7)
