"""runtime_env: validation at options time, deterministic packages by CID, the executor's cache
(extraction checked, once per CID), pip venvs from a local wheel, and a worker started with it."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile

import pytest

from latticaray.runtime.runtime_env import (
    EnvCache,
    Packager,
    RuntimeEnvError,
    env_key,
    package,
    validate,
)


def make_tree(tmp_path):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "input.txt").write_text("hello")
    (work / "helper.py").write_text("VALUE = 41\n")
    (work / "__pycache__").mkdir()
    (work / "__pycache__" / "junk.pyc").write_bytes(b"x")
    (work / "big.bin").write_bytes(b"0" * 1000)
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def twice(x):\n    return 2 * x\n")
    single = tmp_path / "single.py"
    single.write_text("NAME = 'single'\n")
    return work, pkg, single


def test_unsupported_and_malformed_fields_are_refused_when_given():
    with pytest.raises(RuntimeEnvError, match="conda environments are not supported"):
        validate({"conda": "env.yml"})
    with pytest.raises(RuntimeEnvError, match=r"not supported \(supported: env_vars"):
        validate({"nonsense": 1})
    with pytest.raises(RuntimeEnvError, match="str to str"):
        validate({"env_vars": {"A": 1}})
    with pytest.raises(RuntimeEnvError, match="local directory"):
        validate({"working_dir": "/no/such/dir"})
    with pytest.raises(RuntimeEnvError, match=r"package directory or a \.py file"):
        validate({"py_modules": ["/etc/hostname"]})
    with pytest.raises(RuntimeEnvError, match="not allowed"):
        validate({"pip": ["--index-url=http://evil"]})
    assert validate(None) is None and validate({}) is None


def test_packages_are_deterministic_and_cached_per_tree(tmp_path):
    work, pkg, _single = make_tree(tmp_path)
    one = package(str(work), excludes=("*.bin",))
    assert package(str(work), excludes=("*.bin",)) == one
    names = zipfile.ZipFile(io.BytesIO(one)).namelist()
    assert names == ["data/input.txt", "helper.py"]  # __pycache__ and excludes left out
    puts = []

    def put(data):
        puts.append(data)
        return "b" + hashlib.sha256(data).hexdigest()

    packager = Packager(put)
    env = validate({"working_dir": str(work), "py_modules": [str(pkg)], "excludes": ["*.bin"]})
    wire = packager.wire(env)
    assert packager.wire(env) == wire and len(puts) == 2  # cached: not zipped again
    (work / "helper.py").write_text("VALUE = 42\n")
    changed = packager.wire(env)
    assert changed["working_dir"] != wire["working_dir"] and len(puts) == 3
    assert env_key(changed) != env_key(wire) and env_key(None) == ""


def test_a_worker_starts_in_the_environment(tmp_path):
    work, pkg, single = make_tree(tmp_path)
    store = {}

    def put(data):
        cid = "b" + hashlib.sha256(data).hexdigest()
        store[cid] = data
        return cid

    env = validate(
        {
            "working_dir": str(work),
            "py_modules": [str(pkg), str(single)],
            "env_vars": {"MY_FLAG": "on"},
        }
    )
    wire = Packager(put).wire(env)
    cache = EnvCache(str(tmp_path / "cache"))
    missing = cache.missing(wire)
    assert sorted(missing) == sorted(store)
    for cid in missing:
        cache.install(cid, store[cid])
        cache.install(cid, store[cid])  # once per CID
    assert cache.missing(wire) == []
    prepared = cache.prepared(wire)
    code = (
        "import os, helper, mypkg, single; "
        "print(helper.VALUE, mypkg.twice(2), single.NAME, os.environ['MY_FLAG'], "
        "open('data/input.txt').read())"
    )
    out = subprocess.run(
        [prepared.python, "-c", code],
        cwd=prepared.cwd,
        env=prepared.process_env(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["41", "4", "single", "on", "hello"]


def test_a_package_escaping_its_directory_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.txt", "x")
    cache = EnvCache(str(tmp_path / "cache"))
    with pytest.raises(RuntimeEnvError, match="escapes"):
        cache.install("bEVIL", buf.getvalue())
    assert not (tmp_path / "cache" / "evil.txt").exists()
    with pytest.raises(RuntimeEnvError, match="not a zip"):
        cache.install("bBAD", b"not a zip")


def _wheel(tmp_path) -> str:
    """A minimal pure-Python wheel, built here (no network)."""
    path = tmp_path / "lrtestpkg-0.1-py3-none-any.whl"
    files = {
        "lrtestpkg/__init__.py": "MAGIC = 'from-the-wheel'\n",
        "lrtestpkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: lrtestpkg\nVersion: 0.1\n",
        "lrtestpkg-0.1.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "lrtestpkg-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr("lrtestpkg-0.1.dist-info/RECORD", record)
    return str(path)


def test_pip_installs_into_a_cached_venv_that_still_sees_latticaray(tmp_path):
    wheel = _wheel(tmp_path)
    env = validate({"pip": [wheel]})
    wire = Packager(lambda data: "unused").wire(env)
    cache = EnvCache(str(tmp_path / "cache"))
    prepared = cache.prepared(wire)
    assert prepared.python != sys.executable
    out = subprocess.run(
        [prepared.python, "-c", "import lrtestpkg, latticaray; print(lrtestpkg.MAGIC)"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "from-the-wheel"
    # the same list again: the venv is reused, not rebuilt
    mtime = os.path.getmtime(
        os.path.join(os.path.dirname(os.path.dirname(prepared.python)), ".ready")
    )
    assert cache.prepared(wire).python == prepared.python
    assert (
        os.path.getmtime(os.path.join(os.path.dirname(os.path.dirname(prepared.python)), ".ready"))
        == mtime
    )
