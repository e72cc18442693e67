"""The GC policy of node processes: applied by node_main after start-up, off on request.

gcpolicy changes process-wide collector state, so its own checks run in a child interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from latticaray.runtime import gcpolicy
from tests.runtime.meshutil import NodeProcess


def test_node_process_freezes_and_raises_thresholds_after_start_up():
    node = NodeProcess(None, None)
    try:
        gc_info = node.info["gc"]
        assert gc_info["policy"] == "startup"
        # start-up state (modules, the node's services) sits in the permanent generation
        assert gc_info["frozen"] > 10_000
        assert tuple(gc_info["thresholds"]) == gcpolicy.DEFAULT_THRESHOLDS
    finally:
        node.stop()
    assert node.proc.returncode == 0


def test_node_process_with_policy_off_keeps_cpython_defaults():
    node = NodeProcess(None, None, extra_args=("--gc-policy", "off"))
    try:
        assert node.info["gc"] == {"policy": "off", "frozen": 0, "thresholds": [700, 10, 10]}
    finally:
        node.stop()


def test_policy_freezes_survivors_collects_new_cycles_and_frozen_ones_in_full_collections():
    script = textwrap.dedent("""
        import gc, json
        from latticaray.runtime import gcpolicy

        class Cycle:
            def __init__(self):
                self.me = self

        report = gcpolicy.apply_startup_policy()
        assert report.frozen == gc.get_freeze_count() > 0
        kept = [Cycle() for _ in range(1000)]
        before = gc.get_freeze_count()
        after = gcpolicy.refreeze()
        assert after >= before + 1000, (before, after)
        walked = {id(o) for o in gc.get_objects()}  # the permanent generation is not listed
        assert not any(id(k) in walked for k in kept)
        garbage = [Cycle() for _ in range(500)]
        del garbage
        assert gc.collect() >= 500
        del kept  # frozen cycles: invisible to collections until the periodic full one
        assert gc.collect() < 1000
        assert gcpolicy.full_collect_and_refreeze() >= 1000
        assert gc.get_freeze_count() > 0
        print(json.dumps({"frozen": after, "thresholds": gc.get_threshold()}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert '"thresholds": [700, 10, 100]' in out.stdout


def test_init_pauses_the_collector_only_while_it_runs_and_freezes_nothing():
    script = textwrap.dedent("""
        import gc, json
        import latticaray as lattica
        out = []
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            lattica.init(num_cpus=1)
            out.append([enabled, gc.isenabled(), gc.get_freeze_count()])
            lattica.shutdown()
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    # as the user left it, and nothing of the user's process moved to the permanent generation
    assert rows == [[True, True, 0], [False, False, 0]], rows
