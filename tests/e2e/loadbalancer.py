"""A real nginx (Debian `nginx` + `libnginx-mod-stream`) balancing UDP on loopback.

It runs `deploy/nginx-udp.conf` itself, with only the listen port and the upstream servers
replaced, in the foreground (`daemon off;`) with its prefix, pid file and error log in a
temporary directory, and is stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.e2e.harness import REPO

DEPLOY_CONFIG = REPO / "deploy" / "nginx-udp.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def balancer_config(listen_port: int, upstreams: list[int]) -> str:
    """The shipped example, listening on 127.0.0.1:`listen_port`, balancing over the
    instances on 127.0.0.1:`upstreams`."""
    text = DEPLOY_CONFIG.read_text(encoding="utf-8")
    text, listens = re.subn(r"listen \d+ udp", f"listen 127.0.0.1:{listen_port} udp", text)
    servers = "".join(f"        server 127.0.0.1:{port};\n" for port in upstreams)
    text, blocks = re.subn(r"(        server [\d.]+:\d+;\n)+", servers, text)
    assert listens == 1 and blocks == 1, "deploy/nginx-udp.conf changed shape"
    return f"daemon off;\npid nginx.pid;\nerror_log error.log notice;\n{text}"


class Nginx:
    def __init__(self, directory: Path, listen_port: int, upstreams: list[int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = listen_port
        config = directory / "nginx.conf"
        config.write_text(balancer_config(listen_port, upstreams), encoding="utf-8")
        self.process = subprocess.Popen(
            [NGINX, "-p", f"{directory}/", "-c", str(config), "-e", str(directory / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    @property
    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_listening(self) -> None:
        """nginx writes its pid file once the listening sockets are open."""
        deadline = time.monotonic() + 15
        while not (self.directory / "nginx.pid").exists():
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited ({self.process.returncode}):\n{self.error_log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx did not start:\n{self.error_log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
