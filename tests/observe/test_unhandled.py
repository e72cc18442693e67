"""Task errors the driver never retrieved are printed once, with the remote traceback."""

import io
import os
import subprocess
import sys

from latticaray.observe.unhandled import PREFIX, UnhandledErrors
from latticaray.runtime.errors import TaskError

DRIVER = r"""
import gc, sys
import latticaray as lattica

lattica.init(num_cpus=1)

@lattica.remote
def boom(tag):
    def deep_inside():
        raise ValueError(f"kaboom {tag}")
    deep_inside()

@lattica.remote
def fine():
    return 1

def settle(ref):
    lattica.wait([ref], timeout=60)

ref = boom.remote("dropped")
settle(ref)
print("BEFORE-DROP", file=sys.stderr, flush=True)
del ref
gc.collect()
print("AFTER-DROP", file=sys.stderr, flush=True)

ref = boom.remote("retrieved")
try:
    lattica.get(ref, timeout=60)
except ValueError:
    print("RAISED", file=sys.stderr, flush=True)
del ref
gc.collect()

ref = fine.remote()
settle(ref)
del ref
gc.collect()
print("END", file=sys.stderr, flush=True)
lattica.shutdown()
"""


def run(env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("LATTICARAY_IGNORE_UNHANDLED_ERRORS", None)
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_an_error_never_retrieved_is_printed_once_when_its_ref_goes():
    err = run()
    dropped = err.split("BEFORE-DROP", 1)[1].split("AFTER-DROP", 1)[0]
    assert dropped.count("Unhandled error") == 1, err
    assert "kaboom dropped" in dropped and "deep_inside" in dropped  # the remote traceback
    assert "task boom" in dropped and "ValueError" in dropped
    assert "RAISED" in err
    assert err.count("Unhandled error") == 1, err  # not the retrieved one, not the fine one
    assert "kaboom retrieved" not in err.split("RAISED", 1)[1]


def test_it_can_be_silenced():
    err = run({"LATTICARAY_IGNORE_UNHANDLED_ERRORS": "1"})
    assert "Unhandled error" not in err and "END" in err


def test_the_core_prints_each_distinct_error_once():
    out = io.StringIO()
    errors = UnhandledErrors(file=out)
    error = TaskError("train", "ValueError", "Traceback ...\nValueError: bad shard\n")
    assert errors.released(b"a", lambda: error)
    assert not errors.released(b"b", lambda: error)  # the same failure, spread: shown once
    errors.raised([b"c"])
    assert not errors.released(b"c", lambda: RuntimeError("seen by get"))
    assert not errors.released(b"d", None)  # no error, or not visible here
    assert errors.released(b"e", lambda: 1 / 0)  # an error value that does not load
    text = out.getvalue()
    assert text.count(PREFIX) == 2 and "bad shard" in text and "could not be read" in text
    assert errors.printed == 2
