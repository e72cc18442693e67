"""`latticaray status`, `list` and `dashboard` against a fake node (the real one: tests/runtime)."""

import asyncio
import json
import os
import tempfile

import pytest
from statefakes import CONE, GONE, PUBLIC, FakeSource

from latticaray import cli_observe
from latticaray.cli import main
from latticaray.observe.gather import gather


@pytest.fixture
def fake_node(monkeypatch):
    source = FakeSource()
    asked = []

    def connect(address):
        asked.append(address)
        return lambda limit, timeout: asyncio.run(gather(source, limit=limit, timeout=timeout))

    monkeypatch.setattr(cli_observe, "connect", connect)
    return asked


def test_status_shows_the_mesh_a_node_knows(fake_node, capsys):
    assert main(["status", "--address", "unix:/nowhere.sock"]) == 1  # one member is silent
    out = capsys.readouterr().out
    assert fake_node == ["unix:/nowhere.sock"]
    for path in ("unix", "direct", "punched", "relayed"):
        assert path in out
    assert f"no report from {GONE}" in out


def test_list_with_filters_and_formats(fake_node, capsys):
    assert main(["list", "actors", "--filter", "state=alive", "--address", "unix:/x"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["ACTOR_ID", "CLASS_NAME"]
    assert len(lines) == 3 and "Trainer" in out and "DEAD" not in out
    assert main(["list", "tasks", "--filter", "state!=FINISHED", "--filter",
                 f"node_id={PUBLIC}", "--format", "json", "--address", "unix:/x"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["node_id"] == PUBLIC and r["state"] != "FINISHED" for r in rows)
    assert main(["list", "links", "--detail", "--address", "unix:/x"]) == 0
    assert "BYTES_SENT" in capsys.readouterr().out
    assert main(["list", "nodes", "--filter", f"node_id={CONE}", "--address", "unix:/x"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_bad_filters_are_clear_errors(fake_node, capsys):
    assert main(["list", "tasks", "--filter", "nonsense", "--address", "unix:/x"]) == 1
    assert "bad filter" in capsys.readouterr().err
    assert main(["list", "tasks", "--filter", "colour=red", "--address", "unix:/x"]) == 1
    assert "filterable" in capsys.readouterr().err


def test_without_a_node_status_says_how_to_start_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("LATTICARAY_ADDRESS", raising=False)
    monkeypatch.setenv("LATTICARAY_RUN_DIR", str(tmp_path / "run"))
    assert main(["status"]) == 1
    assert "latticaray start" in capsys.readouterr().out
    assert main(["list", "nodes"]) == 1
    assert "latticaray start" in capsys.readouterr().err


def test_local_nodes_are_found_by_their_live_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("LATTICARAY_ADDRESS", raising=False)
    sockets = tmp_path / f"latticaray-{os.getuid()}"
    sockets.mkdir()
    (sockets / f"node-{os.getpid()}.sock").touch()
    (sockets / "node-999999999.sock").touch()  # no such process
    assert cli_observe.find_local_nodes() == [f"unix:{sockets}/node-{os.getpid()}.sock"]
    assert cli_observe.resolve_address(None) == f"unix:{sockets}/node-{os.getpid()}.sock"
    (sockets / f"node-{os.getppid()}.sock").touch()
    with pytest.raises(cli_observe.CliError, match="several nodes"):
        cli_observe.resolve_address(None)
    assert cli_observe.resolve_address("unix:/given") == "unix:/given"


def test_parse_filter():
    assert cli_observe.parse_filter("object_size>=1024") == ("object_size", ">=", "1024")
    assert cli_observe.parse_filter(" state = RUNNING ") == ("state", "=", "RUNNING")
    assert cli_observe.parse_filter("name!=f") == ("name", "!=", "f")
