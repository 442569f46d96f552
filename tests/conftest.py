from __future__ import annotations

import pytest
import torch
from cases import FACTORIES, make_case

# The registry's models are tiny: on a 2-core machine, waking a second thread for every small kernel
# costs more than it saves (the suite measured about 10x slower with 2 threads while another process ran).
torch.set_num_threads(1)


@pytest.fixture(params=sorted(FACTORIES))
def case_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def case(case_name: str) -> dict:
    return make_case(case_name, torch.float64)

