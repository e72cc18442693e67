"""``runtime_env``: the environment a task or actor runs in (Ray's option, the supported part).

Fields supported (anything else is refused with :class:`RuntimeEnvError` when the option is
given, at ``@remote`` / ``.options()`` time, never silently dropped):

* ``env_vars``: ``{str: str}`` set in the worker's environment;
* ``working_dir``: a local directory; it is zipped (deterministically: sorted entries, fixed
  times, so the same tree gives the same bytes), stored in the object store, and on the
  executing node fetched by CID, extracted once per CID into the node's cache, made the
  worker's current directory and put first on its ``sys.path``;
* ``py_modules``: local package directories or ``.py`` files, each packaged the same way and
  importable by its name in the worker;
* ``pip``: a list of requirement strings (or ``{"packages": [...]}``, or the path of a
  requirements file): installed into a virtual environment made once per distinct list (and
  Python version) in the node's cache; the worker runs that environment's interpreter, which
  also sees the node's own packages (latticaray, cloudpickle, ...) behind the installed ones;
* ``excludes``: glob patterns of files to leave out of ``working_dir`` / ``py_modules``.

Three parts:

* :func:`validate` (options time): types, paths, sizes; returns the normalized map.
* :class:`Packager` (driver side): zips directories, puts the zips in the object store through
  the ``put`` callable given (bytes -> CID), cached per path and tree signature; returns the
  *wire* form (CIDs instead of paths) and :func:`env_key` names it (worker pools are per key).
* :class:`EnvCache` (executor side): which CIDs are missing, :meth:`EnvCache.install` of a
  fetched zip (checked: size, member count, no path escaping the target), pip environments,
  and :meth:`EnvCache.prepared` — the interpreter, directory, ``sys.path`` additions and
  variables a worker of that environment starts with.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SUPPORTED_FIELDS",
    "EnvCache",
    "Packager",
    "PreparedEnv",
    "RuntimeEnvError",
    "apply_frame",
    "env_key",
    "validate",
]

SUPPORTED_FIELDS = ("env_vars", "working_dir", "py_modules", "pip", "excludes")
#: Ray fields refused with a pointer to what to use instead.
_REFUSED = {
    "conda": "conda environments are not supported",
    "container": "containers are not supported",
    "image_uri": "container images are not supported",
    "uv": "'uv' is not supported",
    "java_jars": "Java workers are not supported",
    "nsight": "nsight profiling is not supported",
    "worker_process_setup_hook": "worker_process_setup_hook is not supported",
    "config": "runtime_env 'config' is not supported",
}
MAX_PACKAGE_BYTES = 256 * 1024 * 1024
MAX_EXTRACTED_BYTES = 1024 * 1024 * 1024
MAX_FILES = 50_000
_ALWAYS_EXCLUDED = ("__pycache__", ".git", "*.pyc", ".venv")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class RuntimeEnvError(ValueError):
    """A runtime_env is malformed, uses an unsupported field, or could not be set up."""


def _check_str_map(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise RuntimeEnvError(f"runtime_env[{name!r}] must be a dict of str to str")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise RuntimeEnvError(
                f"runtime_env[{name!r}] must map str to str, got {key!r}: {val!r}"
            )
        if not key or "=" in key or "\0" in key or "\0" in val:
            raise RuntimeEnvError(f"runtime_env[{name!r}] has a bad variable name {key!r}")
        out[key] = val
    return out


def _pip_list(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        unknown = set(value) - {"packages", "pip_check"}
        if unknown:
            raise RuntimeEnvError(f"runtime_env['pip'] has unsupported keys {sorted(unknown)}")
        value = value.get("packages", [])
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise RuntimeEnvError(
                f"runtime_env['pip'] as a string must be a requirements file; {value!r} is not one"
            )
        with open(value) as f:
            value = [
                line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")
            ]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RuntimeEnvError("runtime_env['pip'] must be a list of requirement strings")
    out = []
    for req in value:
        req = req.strip()
        if not req or (req.startswith("-") and not req.startswith(("-e ", "--editable"))):
            raise RuntimeEnvError(f"runtime_env['pip'] requirement {req!r} is not allowed")
        if os.path.exists(req):  # a local wheel / sdist / project: by absolute path
            req = os.path.abspath(req)
        out.append(req)
    return out


def validate(runtime_env: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Check a runtime_env given as an option; returns its normalized form (None: none)."""
    if runtime_env is None:
        return None
    if not isinstance(runtime_env, Mapping):
        raise RuntimeEnvError(f"runtime_env must be a dict, got {type(runtime_env).__name__}")
    out: dict[str, Any] = {}
    for name, value in runtime_env.items():
        if name in _REFUSED:
            raise RuntimeEnvError(f"runtime_env[{name!r}]: {_REFUSED[name]}")
        if name not in SUPPORTED_FIELDS:
            raise RuntimeEnvError(
                f"runtime_env field {name!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_FIELDS)})"
            )
        if value is None:
            continue
        if name == "env_vars":
            out[name] = _check_str_map(value, name)
        elif name == "working_dir":
            if not isinstance(value, (str, os.PathLike)) or not os.path.isdir(value):
                raise RuntimeEnvError(
                    f"runtime_env['working_dir'] must be a local directory, got {value!r}"
                )
            out[name] = os.path.abspath(value)
        elif name == "py_modules":
            if not isinstance(value, (list, tuple)):
                raise RuntimeEnvError("runtime_env['py_modules'] must be a list of paths")
            mods = []
            for mod in value:
                if not isinstance(mod, (str, os.PathLike)):
                    raise RuntimeEnvError(f"py_modules entry {mod!r} is not a path")
                path = os.path.abspath(mod)
                if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".py"))):
                    raise RuntimeEnvError(
                        f"py_modules entry {mod!r} must be a package directory or a .py file"
                    )
                mods.append(path)
            out[name] = mods
        elif name == "pip":
            out[name] = _pip_list(value)
        elif name == "excludes":
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise RuntimeEnvError("runtime_env['excludes'] must be a list of glob patterns")
            out[name] = list(value)
    return out or None


# packaging (driver side) ------------------------------------------------------------------------


def _excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    parts = rel.split("/")
    for pattern in patterns:
        if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(p, pattern) for p in parts):
            return True
    return False


def _tree(root: str, prefix: str, patterns: tuple[str, ...]) -> list[tuple[str, str]]:
    """(archive name, file path) of every file to package, sorted."""
    if os.path.isfile(root):
        return [(prefix + os.path.basename(root), root)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        dirnames[:] = sorted(d for d in dirnames if not _excluded(rel_dir + d, patterns))
        for name in sorted(filenames):
            rel = rel_dir + name
            path = os.path.join(dirpath, name)
            if _excluded(rel, patterns) or not os.path.isfile(path):
                continue
            out.append((prefix + rel, path))
            if len(out) > MAX_FILES:
                raise RuntimeEnvError(f"{root} has more than {MAX_FILES} files to package")
    return sorted(out)


def _signature(files: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, path in files:
        st = os.stat(path)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def package(root: str, prefix: str = "", excludes: tuple[str, ...] = ()) -> bytes:
    """A deterministic zip of ``root`` (a directory, or one file) under ``prefix``."""
    files = _tree(root, prefix, _ALWAYS_EXCLUDED + tuple(excludes))
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in files:
            total += os.path.getsize(path)
            if total > MAX_PACKAGE_BYTES:
                raise RuntimeEnvError(
                    f"{root} holds more than {MAX_PACKAGE_BYTES >> 20} MiB to package; "
                    f"leave large files out with runtime_env['excludes']"
                )
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.external_attr = (os.stat(path).st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as f:
                zf.writestr(info, f.read())
    return buf.getvalue()


def env_key(wire: Mapping[str, Any] | None) -> str:
    """A short stable name of a wire-form environment ("" for none): worker pools are keyed by it."""
    if not wire:
        return ""
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


class Packager:
    """Driver side: a validated runtime_env -> its wire form (paths replaced by CIDs)."""

    def __init__(self, put: Callable[[bytes], str]) -> None:
        self.put = put
        self._cache: dict[tuple[str, str, str, tuple[str, ...]], str] = {}

    def _cid(self, path: str, prefix: str, excludes: tuple[str, ...]) -> str:
        files = _tree(path, prefix, _ALWAYS_EXCLUDED + excludes)
        key = (path, prefix, _signature(files), excludes)
        cid = self._cache.get(key)
        if cid is None:
            cid = self._cache[key] = self.put(package(path, prefix, excludes))
        return cid

    def wire(self, env: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if not env:
            return None
        excludes = tuple(env.get("excludes", ()))
        out: dict[str, Any] = {}
        if env.get("env_vars"):
            out["env_vars"] = dict(env["env_vars"])
        if env.get("working_dir"):
            out["working_dir"] = self._cid(env["working_dir"], "", excludes)
        if env.get("py_modules"):
            out["py_modules"] = [
                self._cid(
                    path, "" if os.path.isfile(path) else os.path.basename(path) + "/", excludes
                )
                for path in env["py_modules"]
            ]
        if env.get("pip"):
            out["pip"] = list(env["pip"])
        return out or None


# executor side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedEnv:
    """How a worker of one environment starts."""

    key: str
    python: str
    cwd: str | None
    sys_path: tuple[str, ...]
    env_vars: dict[str, str] = field(default_factory=dict)

    def process_env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env.update(self.env_vars)
        if self.sys_path:
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = os.pathsep.join([*self.sys_path, *([old] if old else [])])
        return env


def _safe_extract(data: bytes, target: str) -> None:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise RuntimeEnvError(f"runtime_env package is not a zip: {exc}") from exc
    with zf:
        members = zf.infolist()
        if len(members) > MAX_FILES:
            raise RuntimeEnvError(f"runtime_env package has more than {MAX_FILES} files")
        if sum(m.file_size for m in members) > MAX_EXTRACTED_BYTES:
            raise RuntimeEnvError("runtime_env package expands beyond its size limit")
        root = os.path.realpath(target)
        for member in members:
            name = member.filename
            dest = os.path.realpath(os.path.join(root, name))
            if name.startswith("/") or ".." in name.split("/") or not dest.startswith(root):
                raise RuntimeEnvError(f"runtime_env package member {name!r} escapes its directory")
        zf.extractall(root)
        for member in members:
            mode = (member.external_attr >> 16) & 0o777
            if mode and not member.is_dir():
                os.chmod(os.path.join(root, member.filename), mode | 0o400)


class EnvCache:
    """A node's cache of runtime environments: extracted packages per CID, pip venvs."""

    def __init__(self, root: str, python: str | None = None) -> None:
        self.root = root
        self.python = python or sys.executable
        os.makedirs(os.path.join(root, "pkgs"), exist_ok=True)
        os.makedirs(os.path.join(root, "venvs"), exist_ok=True)

    def _pkg_dir(self, cid: str) -> str:
        if not cid or "/" in cid or cid.startswith("."):
            raise RuntimeEnvError(f"bad package id {cid!r}")
        return os.path.join(self.root, "pkgs", cid)

    def missing(self, wire: Mapping[str, Any]) -> list[str]:
        """CIDs of the environment's packages not extracted here yet (fetch, then install)."""
        cids = ([wire["working_dir"]] if wire.get("working_dir") else []) + list(
            wire.get("py_modules", [])
        )
        return [c for c in cids if not os.path.isdir(self._pkg_dir(c))]

    def install(self, cid: str, data: bytes) -> str:
        """Extract a fetched package (once per CID; concurrent installs are safe)."""
        final = self._pkg_dir(cid)
        if os.path.isdir(final):
            return final
        tmp = tempfile.mkdtemp(prefix=f".{cid[:16]}-", dir=os.path.join(self.root, "pkgs"))
        try:
            _safe_extract(data, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def venv_for(self, requirements: list[str], timeout: float = 600.0) -> str:
        """The interpreter of a venv holding ``requirements`` (made once; blocking: call it off
        the event loop). The venv also sees this interpreter's packages, behind its own."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        digest = hashlib.sha256(json.dumps([version, sorted(requirements)]).encode()).hexdigest()
        path = os.path.join(self.root, "venvs", digest[:20])
        python = os.path.join(path, "bin", "python")
        ready = os.path.join(path, ".ready")
        if os.path.exists(ready):
            return python
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(ready):
                return python
            shutil.rmtree(path, ignore_errors=True)
            self._run([self.python, "-m", "venv", "--without-pip", path], timeout, "venv")
            site = self._site_packages(python, timeout)
            parents = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
            with open(os.path.join(site, "_latticaray_parent.pth"), "w") as f:
                f.write("\n".join(parents) + "\n")
            self._run(
                [
                    python,
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--retries",
                    "0",
                    "--timeout",
                    "15",
                    *requirements,
                ],
                timeout,
                "pip install",
            )
            with open(ready, "w") as f:
                f.write("\n".join(requirements))
        return python

    @staticmethod
    def _site_packages(python: str, timeout: float) -> str:
        out = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return out.stdout.strip()

    @staticmethod
    def _run(cmd: list[str], timeout: float, what: str) -> None:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeEnvError(f"runtime_env {what} took longer than {timeout:.0f}s") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise RuntimeEnvError(f"runtime_env {what} failed (exit {proc.returncode}):\n{tail}")

    def prepared(self, wire: Mapping[str, Any]) -> PreparedEnv:
        """The worker start of ``wire`` once :meth:`missing` is empty and pip is installed."""
        missing = self.missing(wire)
        if missing:
            raise RuntimeEnvError(f"runtime_env packages not installed here: {missing}")
        cwd = self._pkg_dir(wire["working_dir"]) if wire.get("working_dir") else None
        paths = ([cwd] if cwd else []) + [self._pkg_dir(c) for c in wire.get("py_modules", [])]
        python = self.venv_for(list(wire["pip"])) if wire.get("pip") else self.python
        return PreparedEnv(
            env_key(wire), python, cwd, tuple(paths), dict(wire.get("env_vars") or {})
        )


# worker side ------------------------------------------------------------------------------------


def apply_frame(frame: Mapping[str, Any] | None) -> Callable[[], None]:
    """In a worker, before a task or actor runs: its environment's variables, working
    directory and import paths (the frame the node sends, ``NodeEnvs.frame``). Returns what
    puts the worker back as it was (pooled workers run tasks of other environments next)."""
    if not frame:
        return lambda: None
    env = dict(frame.get("env") or {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_cwd = None
    if frame.get("cwd"):
        old_cwd = os.getcwd()
        os.chdir(frame["cwd"])
    added = [p for p in frame.get("path") or () if p not in sys.path]
    sys.path[:0] = added

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if old_cwd is not None:
            os.chdir(old_cwd)
        for p in added:
            if p in sys.path:
                sys.path.remove(p)

    return restore
