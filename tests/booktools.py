"""Building the book (as `make book` does) into a scratch directory, and opening its
pages in headless Chromium behind a proxy that records every request leaving the machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"

# Chromium's own services (its component updater and sign-in) call home whatever the page
# is; these exact hosts are not requests made by the book. Anything else is.
CHROMIUM_OWN_HOSTS = {"update.googleapis.com", "accounts.google.com", "clients2.google.com"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
                  "--disable-client-side-phishing-detection",
                  "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter"]


def new_source(tmp: Path, notebooks: dict) -> Path:
    """A book source tree: the real index page and `notebooks` ({stem: nbformat notebook})
    as its lessons. The configuration and the extension are the real ones (`-c book`)."""
    import nbformat

    src = tmp / "src"
    (src / "lessons").mkdir(parents=True)
    shutil.copy(BOOK / "index.md", src / "index.md")
    for stem, nb in notebooks.items():
        nbformat.write(nb, src / "lessons" / f"{stem}.ipynb")
    return src


def book_command(src: Path, out: Path, *settings: str, env: dict | None = None, timeout: int = 600):
    """`python -m reference_engine book` (what `make book` runs) on another source folder,
    with Sphinx settings (NAME=VALUE) added."""
    cmd = [sys.executable, "-m", "reference_engine", "book", "--quiet", "--source", str(src), "--out", str(out)]
    for setting in settings:
        cmd += ["--set", setting]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


class RecordingProxy:
    """A proxy that answers nothing and writes down the first line of every request."""

    def __init__(self):
        self.requests: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(4096).split(b"\r\n")[0].decode(errors="replace"))
                except OSError:
                    pass

    def external(self, since: int = 0) -> list[str]:
        """Requests (from the `since`-th on) whose host is not one of Chromium's own services."""
        return [r for r in self.requests[since:] if r and host_of(r) not in CHROMIUM_OWN_HOSTS]

    def close(self):
        self.server.close()


def host_of(request_line: str) -> str:
    parts = request_line.split()
    target = parts[1] if len(parts) > 1 else ""
    target = target.split("://", 1)[-1]  # GET http://host/path or CONNECT host:443
    return target.split("/", 1)[0].rsplit(":", 1)[0]


def chromium_dom(url: str, profile: Path, proxy: RecordingProxy) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the book's test needs Debian's chromium: apt-get install chromium (make test installs it as root)"
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{proxy.port}",
             "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=10000", "--dump-dom", url]
    return subprocess.run([chromium, *flags], capture_output=True, text=True, timeout=120).stdout
