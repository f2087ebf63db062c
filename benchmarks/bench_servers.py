"""Start, health-check and always stop the server subprocesses that the benchmark talks to."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

HOST = "127.0.0.1"

# Nothing the benchmark starts may reach a hub; loopback must never go through a proxy.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "PYTHONUNBUFFERED": "1",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGKILL if the benchmark itself is killed (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ManagedServer:
    """A server subprocess in its own process group, killed as a group on exit (also on Ctrl-C).

    Usage: `with ManagedServer(name, cmd, port, log_path) as srv: srv.wait_healthy(300)`.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        log_path: Path,
        env: dict[str, str],
        unset_env: tuple[str, ...] = (),
    ):
        self.name = name
        self.cmd = cmd
        self.port = port
        self.base_url = f"http://{HOST}:{port}"
        self.log_path = log_path
        inherited = {k: v for k, v in os.environ.items() if k not in unset_env}
        self.env = {**inherited, **OFFLINE_ENV, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ManagedServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"{self.name}: starting: {' '.join(self.cmd)}  (log: {self.log_path})")
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # own process group, so we can kill its children too
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, grace_s: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        log(f"{self.name}: stopping (pid {proc.pid})")
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may be gone while others in its group linger; make sure they go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def log_tail(self, n_lines: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])

    def wait_healthy(self, timeout_s: float, path: str = "/health") -> None:
        """Poll GET `path` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout_s
        start = time.monotonic()
        next_note = start + 15.0
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise RuntimeError(
                        f"{self.name} exited (code {code}) before becoming healthy; "
                        f"log tail:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.base_url + path).status_code == 200:
                        log(f"{self.name}: healthy after {time.monotonic() - start:.1f} s")
                        return
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(
                        f"{self.name} not healthy after {timeout_s:.0f} s; "
                        f"log tail:\n{self.log_tail()}"
                    )
                if now >= next_note:
                    log(f"{self.name}: waiting for {path} ({now - start:.0f} s so far)")
                    next_note = now + 15.0
                time.sleep(1.0)
