"""Headless Chromium (Debian's ``chromium``) for looking at a page: a screenshot, the DOM after load,
and every URL the page asked for (Chromium's net log). Used by the report's tests and by
``scripts/docs_images.py``; ``scripts/install_chromium.sh`` installs the browser.

Chromium runs with a fresh profile in a temporary folder, without background networking (updates,
sync, field trials, network time), behind a proxy at a closed loopback port and with every host name
but 127.0.0.1 unresolvable: whatever it or a page tries, it opens no connection beyond loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
    "--metrics-recording-only",
    "--no-default-browser-check",
    "--no-pings",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter",
    # Nothing leaves the machine: requests go to a proxy on a closed loopback port, names do not resolve.
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def find_chromium() -> str | None:
    """The path of a ``chromium`` (or ``chromium-browser``) binary on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Visit:
    """What Chromium saw of one page: the DOM after load; the URLs the page requested (not the file itself,
    nor Chromium's own background requests); the addresses of every TCP connection tried by anyone."""

    dom: str
    page_requests: list[str]
    connections: list[str]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH; run scripts/install_chromium.sh")
    with tempfile.TemporaryDirectory(prefix="trackin-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _url(path: str | os.PathLike) -> str:
    return Path(path).resolve().as_uri()


def screenshot(
    page: str | os.PathLike, out: str | os.PathLike, *, width: int = 1280, height: int = 2400, timeout: float = 120.0
) -> Path:
    """Save a PNG screenshot of the local HTML file ``page`` at ``out`` (``width`` × ``height`` pixels)."""
    out = Path(out).resolve()
    done = _run([f"--screenshot={out}", f"--window-size={width},{height}", _url(page)], timeout)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return out


def visit(page: str | os.PathLike, *, timeout: float = 120.0) -> Visit:
    """Load the local HTML file ``page``; return its DOM after load, the URLs it requested and the TCP
    connections tried meanwhile (from Chromium's ``--log-net-log``)."""
    with tempfile.TemporaryDirectory(prefix="trackin-netlog-") as tmp:
        log = os.path.join(tmp, "net.json")
        done = _run([f"--log-net-log={log}", "--net-log-capture-mode=Everything", "--dump-dom", _url(page)], timeout)
        events = _events(log) if os.path.exists(log) else []
    if not done.stdout.strip():
        raise RuntimeError(f"chromium printed no DOM (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    requests = sorted(
        {
            p["url"]
            for t, p in events
            if t == "URL_REQUEST_START_JOB" and "url" in p and p.get("initiator") != "not an origin"
        }
    )  # Chromium's own requests have no origin
    connections = sorted({str(p["address"]) for t, p in events if t == "TCP_CONNECT_ATTEMPT" and "address" in p})
    return Visit(dom=done.stdout, page_requests=requests, connections=connections)


def _events(path: str) -> list[tuple[str, dict]]:
    """(event type name, params) of every event in a Chromium net log (JSON; a cut-short log is closed)."""
    text = Path(path).read_text(errors="replace").rstrip().rstrip(",")
    log = None
    for tail in ("", "]}", "}]}"):
        try:
            log = json.loads(text + tail)
            break
        except json.JSONDecodeError:
            continue
    if not isinstance(log, dict):
        return []
    names = {v: k for k, v in (log.get("constants", {}).get("logEventTypes") or {}).items()}
    return [(names.get(e.get("type"), str(e.get("type"))), e.get("params") or {}) for e in log.get("events", [])]
