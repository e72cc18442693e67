"""A small W3C WebDriver client (standard library only) for Debian's chromium + chromedriver.

Starts chromedriver on a free loopback port and one headless Chromium session with a fresh
profile, no network services of its own (no sync, updates, QUIC or first-run pages), and the
browser console log kept so a test can assert the page logged no errors.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("LATTICARAY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LATTICARAY_CHROMEDRIVER", "/usr/bin/chromedriver")

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-default-browser-check",
    "--hide-scrollbars",
]


def available() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


class WebDriverError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One chromedriver process and one headless Chromium session; a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout: float = 60.0) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self.port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="latticaray-chromium-")
        self.driver: subprocess.Popen | None = None
        self.session: str | None = None

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.log_path = Path(self.profile) / "chromedriver.log"
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", f"--log-path={self.log_path}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self._call("GET", "/status", timeout=2)["value"].get("ready"):
                    break
            except (OSError, WebDriverError):
                pass
            if self.driver.poll() is not None:
                raise WebDriverError(f"chromedriver exited with {self.driver.returncode}")
            if time.monotonic() > deadline:
                raise WebDriverError("chromedriver did not become ready")
            time.sleep(0.1)
        args = [*CHROMIUM_ARGS, f"--user-data-dir={self.profile}/profile",
                f"--window-size={self.width},{self.height}"]  # fmt: skip
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                    "goog:loggingPrefs": {"browser": "ALL"},
                }
            }
        }
        self.session = self._call("POST", "/session", caps)["value"]["sessionId"]

    def close(self) -> None:
        if self.session is not None:
            try:
                self._call("DELETE", f"/session/{self.session}", timeout=20)
            except (OSError, WebDriverError):
                pass
            self.session = None
        if self.driver is not None:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(5)
            self.driver = None
        shutil.rmtree(self.profile, ignore_errors=True)

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise WebDriverError(f"{method} {path}: HTTP {exc.code}: {detail}") from None

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)["value"]

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def execute(self, script: str, *args):
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 30.0, what: str = "condition"):
        """Poll a script until it returns a truthy value; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.execute(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"browser: {what} not met within {timeout:.0f} s")
            time.sleep(0.1)

    def screenshot(self, path: str | Path) -> None:
        Path(path).write_bytes(base64.b64decode(self._session("GET", "/screenshot")))

    def console(self) -> list[dict]:
        """The browser console entries since the last call."""
        return self._session("POST", "/se/log", {"type": "browser"})
