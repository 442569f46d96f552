"""EK-FAC on a grouped convolution: the fitted eigenvalues are the GGN's diagonal in K-FAC's eigenbasis, per group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature

F64 = torch.float64


@pytest.mark.parametrize("groups, rows", [(2, 36), (4, 4)])  # 4 groups over 4 output positions: equal sizes
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_eigenbasis_per_group(groups: int, rows: int) -> None:
    """s_ab = (q_a ⊗ q_b)ᵀ GGN (q_a ⊗ q_b) within each group (George et al. 2018). The rows of each group are
    projected with that group's eigenvectors (a product broadcast over the groups mixed them up)."""
    torch.manual_seed(0)
    side = int(rows**0.5)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(8 * rows, 3)).double()
    data = (torch.randn(6, 4, side, side, dtype=F64), torch.randint(0, 3, (6,)))
    ggn = curvature.reference.ggn(model, nn.CrossEntropyLoss(), data, params=[conv.weight, conv.bias])
    eigen = curvature.EKFACOperator(model, nn.CrossEntropyLoss(), data, params=[conv.weight, conv.bias]).eigh()[0]
    out, cols = 8 // groups, conv.weight[0].numel()
    for g in range(groups):
        channels = torch.arange(g * out, (g + 1) * out)
        weight = (channels.unsqueeze(1) * cols + torch.arange(cols)).reshape(out, cols)
        index = torch.cat([weight, (8 * cols + channels).unsqueeze(1)], dim=1).reshape(-1)  # row-major (i, j)
        U = torch.kron(eigen.row_eigenvectors[g], eigen.col_eigenvectors[g])
        expected = torch.diagonal(U.T @ ggn[index][:, index] @ U).reshape(out, cols + 1)
        assert torch.allclose(eigen.eigenvalues[g], expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
