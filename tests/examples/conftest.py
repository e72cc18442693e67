"""Fixtures for the examples' tests, and the examples' folders on sys.path (running an example:
exampleutil.py)."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")
for sub in ("", "sharded_inference", "federated_averaging", "model_distribution"):
    path = os.path.join(EXAMPLES, sub)
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="module")
def embedded():
    """An embedded node for tests that drive the examples' actors from this process."""
    import latticaray as lattica

    lattica.init(num_cpus=2)
    yield lattica
    lattica.shutdown()
