"""Fixtures for runtime tests: one embedded latticaray node per test module."""

import pytest

import latticaray as lattica


@pytest.fixture(scope="module")
def runtime():
    lattica.init(num_cpus=2, resources={"widget": 1})
    yield lattica
    lattica.shutdown()
