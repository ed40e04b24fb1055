"""Headless Chromium driven over the DevTools protocol, for the dashboard's browser test.

Debian's ``chromium`` package is the browser (``make test`` installs it, see
``scripts/system-deps``); nothing downloads a browser of its own. The driver
is the protocol itself, over a plain websocket (``websockets``' synchronous
client): start the browser on ``--remote-debugging-port=0``, read the port
it chose from ``DevToolsActivePort`` in its profile, attach to its page and
send commands. Only what a test needs: navigate, evaluate JavaScript, wait
for a condition on the page, take a screenshot.

L{ensure_chromium} finds the browser or installs it. A test skips only when
it truly cannot be had outside CI; under CI (``CI`` set) a missing browser
fails the test, so that it never passes by not running.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from shardkv.testing.polling import poll_until

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_DEADLINE = 30.0
CALL_DEADLINE = 30.0
ROOT = Path(__file__).resolve().parents[2]


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def ensure_chromium() -> str:
    """The browser's path, installing Debian's ``chromium`` if it is missing.

    Skips the calling test if it cannot be installed here, except under CI,
    where that fails the test instead.
    """
    found = find_chromium()
    if found is not None:
        return found
    install = subprocess.run(
        [str(ROOT / "scripts" / "system-deps"), "chromium"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    found = find_chromium()
    if found is not None:
        return found
    why = (
        "chromium is not installed and `scripts/system-deps chromium` could not install it "
        f"(exit {install.returncode}): {(install.stderr or install.stdout).strip()[-400:]}"
    )
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


class BrowserError(AssertionError):
    """The page threw, or the browser answered a command with an error."""


class Chromium:
    """One headless browser with one page; close it (or use ``with``) to end the process."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 860) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.log_path = profile.parent / "chromium.log"
        args = [
            binary,
            "--headless=new",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # the sandbox refuses to run as root
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._ids = itertools.count(1)
        self._closing = ExitStack()
        try:
            port = poll_until(
                lambda: self._port(profile),
                START_DEADLINE,
                "chromium's DevTools port",
                alive=self._alive,
            )
            self.ws = self._attach(port)
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.close()
            raise

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"chromium exited with status {self.proc.returncode}: {self.tail()}"
            )

    @staticmethod
    def _port(profile: Path) -> int | None:
        try:
            first = (profile / "DevToolsActivePort").read_text().split("\n", 1)[0].strip()
        except OSError:
            return None
        return int(first) if first.isdigit() else None

    def _attach(self, port: int) -> ClientConnection:
        def page() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
            urls = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
            return urls[0] if urls else None

        url = poll_until(page, START_DEADLINE, "chromium's page target", alive=self._alive)
        # Entered as a context (newer websockets deprecate a bare connect()); close() exits it.
        return self._closing.enter_context(connect(url, max_size=None, open_timeout=START_DEADLINE))

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- the protocol -------------------------------------------------------------

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result, skipping the events sent meanwhile."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        end = time.monotonic() + CALL_DEADLINE
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{method}: no answer in {CALL_DEADLINE} s")
            message = json.loads(self.ws.recv(timeout=remaining))
            if message.get("id") != ident:
                continue
            if "error" in message:
                raise BrowserError(f"{method}: {message['error']}")
            result: dict[str, Any] = message.get("result", {})
            return result

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        poll_until(
            lambda: self.evaluate("document.readyState") == "complete",
            START_DEADLINE,
            f"{url} to load",
        )

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression on the page (promises awaited), as JSON."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]!r} threw: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, deadline: float, what: str) -> Any:
        """Poll ``expression`` on the page until it is truthy; return its value."""
        return poll_until(lambda: self.evaluate(expression), deadline, what, alive=self._alive)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    # -- the process --------------------------------------------------------------

    def close(self) -> None:
        self._closing.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
