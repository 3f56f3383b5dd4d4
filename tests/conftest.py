"""Shared fixtures. Tests run ranks in spawned processes through `harness.run_ranks`."""
import pytest

from harness import fresh_seed


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; printed (shown on failure) and fixed by FLASHEP_TEST_SEED."""
    return fresh_seed()
