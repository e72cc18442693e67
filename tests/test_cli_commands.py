"""The CLI subcommands that hand over to the runtime: invite, start, microbenchmark."""

import os
import subprocess
import sys

import pytest

from latticaray.runtime.admission import MeshKey, verify_credential
from latticaray.runtime.errors import CredentialError

CLI = [sys.executable, "-m", "latticaray"]


def run_cli(*args, timeout=60):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_invite_prints_a_credential_the_mesh_key_verifies(tmp_path):
    key_path = tmp_path / "mesh.key"
    out = run_cli(
        "invite", "--mesh-key-path", str(key_path), "--peer-id", "12D3KooWAlice", "--ttl", "60"
    )
    assert out.returncode == 0, out.stderr
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    mesh_public = MeshKey.load_or_create(str(key_path)).public_bytes
    credential = verify_credential(out.stdout.strip(), mesh_public, peer_id="12D3KooWAlice")
    assert credential.peer == "12D3KooWAlice"
    with pytest.raises(CredentialError):
        verify_credential(out.stdout.strip(), mesh_public, peer_id="12D3KooWMallory")
    other = MeshKey.generate().public_bytes
    with pytest.raises(CredentialError):
        verify_credential(out.stdout.strip(), other)


def test_subcommands_pass_their_own_options_through():
    start = run_cli("start", "--help")
    assert start.returncode == 0 and "--credential" in start.stdout
    bench = run_cli("microbenchmark", "--help")
    assert bench.returncode == 0 and "--duration" in bench.stdout
    bad = run_cli("down", "--no-such-option")
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
