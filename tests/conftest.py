from __future__ import annotations

import pytest
import torch
from cases import FACTORIES, make_case


@pytest.fixture(params=sorted(FACTORIES))
def case_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def case(case_name: str) -> dict:
    return make_case(case_name, torch.float64)

