"""The fuzz harness in CI: every crash input found so far stays fixed, and a short seeded pass of
each target runs clean (the long runs are `make fuzz FUZZ_SECONDS=...`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).with_name("regressions")
sys.path.insert(0, str(ROOT))

from fuzz.targets import TARGETS  # noqa: E402

pytest.importorskip("atheris", reason="atheris is a test dependency (pip install -e '.[test]')")


def _regressions():
    return sorted(REGRESSIONS.glob("*.bin"))


@pytest.mark.parametrize("path", _regressions(), ids=lambda p: p.stem)
def test_crash_inputs_found_by_fuzzing_are_refused_cleanly(path):
    target = TARGETS[path.stem.split("-", 1)[0]]
    try:
        target.run(path.read_bytes())
    except target.allowed:
        pass


def test_every_target_has_seeds_its_decoder_accepts():
    for target in TARGETS.values():
        seeds = list(target.seeds())
        assert seeds, target.name
        accepted = 0
        for seed in seeds:
            try:
                target.run(seed)
                accepted += 1
            except target.allowed:
                pass
        assert accepted, f"{target.name}: no seed decodes, so fuzzing starts from nothing valid"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_short_seeded_fuzz_pass_finds_no_crash(name, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, "--runs=3000", "--seed=1", "--timeout=10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 3000 runs" in proc.stderr
