"""Fixtures for object-store tests: stores in a per-test shared-memory directory, always removed."""

import os
import shutil
import tempfile

import pytest

from latticaray.objectstore.store import LocalStore


@pytest.fixture
def store_dirs():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    shm = tempfile.mkdtemp(prefix="latticaray-test-", dir=base)
    spill = tempfile.mkdtemp(prefix="latticaray-test-spill-")
    try:
        yield shm, spill
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)


@pytest.fixture
def make_store(store_dirs):
    shm, spill = store_dirs
    created = []

    def make(name="node", **kwargs):
        kwargs.setdefault("capacity_bytes", 256 << 20)
        store = LocalStore(os.path.join(shm, name), spill_dir=os.path.join(spill, name), **kwargs)
        created.append(store)
        return store

    yield make
    for store in created:
        store.destroy()
