"""Fixtures of the NAT tests: one netlab per session under a prefix of our own, always torn down."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from netlab_util import lab, netlab_available

LAB_PREFIX = os.environ.get("LATTICARAY_NAT_LAB_PREFIX", f"lrn{os.getpid() % 100000}")


@pytest.fixture(scope="session")
def nat_lab():
    reason = netlab_available()
    if reason is not None:
        pytest.skip(reason)
    with lab(LAB_PREFIX) as status:
        yield LAB_PREFIX, status
