"""``runtime_env`` on the node that runs a task or actor (the executor side).

The wire form of an environment (``opts.renv``, made by the submitter with
:class:`latticaray.runtime.runtime_env.Packager`: ``env_vars``, and ``working_dir`` /
``py_modules`` as the CIDs of their packages in the object store) is made ready here before the
work runs: the packages this node lacks are fetched by CID through the node's object paths
(the store, the mesh) and extracted once per CID into the node's
:class:`~latticaray.runtime.runtime_env.EnvCache`. The worker is then sent the environment's
frame (``renv``: variables, working directory, import paths), which it applies for the task
(and restores after it) or for the actor's lifetime.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from latticaray.runtime import serialization
from latticaray.runtime.runtime_env import EnvCache, RuntimeEnvError

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

__all__ = ["NodeEnvs"]

FETCH_TIMEOUT = 120.0


class NodeEnvs:
    """The node's environment cache and the fetches that fill it."""

    def __init__(self, node: RuntimeNode):
        self.node = node
        self._cache: EnvCache | None = None
        #: CID -> callbacks (error or None) of the work waiting for its package
        self._fetching: dict[str, list[Callable[[BaseException | None], None]]] = {}

    @property
    def cache(self) -> EnvCache:
        if self._cache is None:
            root = os.path.join(tempfile.gettempdir(), f"latticaray-{os.getuid()}", "envs")
            self._cache = EnvCache(root)
        return self._cache

    def ready(
        self, renv: dict | None, then: Callable[[], None], fail: Callable[[BaseException], None]
    ) -> bool:
        """True when ``renv`` can be applied now; else its packages are fetched and ``then``
        (or ``fail``) is called once they are here (or cannot be)."""
        if not renv:
            return True
        if renv.get("pip"):  # refused at options time; a peer's message may still carry it
            fail(RuntimeEnvError("runtime_env 'pip' is not supported on this node"))
            return False
        try:
            missing = self.cache.missing(renv)
        except RuntimeEnvError as exc:
            fail(exc)
            return False
        if not missing:
            return True
        left = set(missing)

        def one_done(cid: str, error: BaseException | None) -> None:
            if not left:
                return  # failed already
            if error is not None:
                left.clear()
                fail(error)
                return
            left.discard(cid)
            if not left:
                then()

        for cid in missing:
            waiters = self._fetching.get(cid)
            callback = lambda error, cid=cid: one_done(cid, error)  # noqa: E731
            if waiters is not None:
                waiters.append(callback)
                continue
            self._fetching[cid] = [callback]
            self.node.spawn(self._fetch(cid))
        return False

    async def _fetch(self, cid: str) -> None:
        node = self.node
        error: BaseException | None = None
        try:
            reply = await node.objects.get_by_cid({"cid": cid, "timeout": FETCH_TIMEOUT})
            if "error" in reply:
                raise RuntimeEnvError(str(serialization.deserialize(reply["error"])))
            _status, data = reply["val"]
            value = serialization.deserialize(data)
            if not isinstance(value, bytes):
                raise RuntimeEnvError(f"runtime_env package {cid} is not a package")
            assert node.loop is not None
            await node.loop.run_in_executor(None, self.cache.install, cid, value)
        except BaseException as exc:  # every waiter learns why
            error = RuntimeEnvError(f"runtime_env package {cid} could not be set up: {exc}")
        for callback in self._fetching.pop(cid, []):
            callback(error)

    def frame(self, renv: dict | None) -> dict[str, Any] | None:
        """What the worker applies: ``env`` (variables), ``cwd``, ``path`` (import paths)."""
        if not renv:
            return None
        prepared = self.cache.prepared(renv)
        return {
            "env": dict(prepared.env_vars),
            "cwd": prepared.cwd,
            "path": list(prepared.sys_path),
        }
