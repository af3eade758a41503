"""N local MiniVault replicas behind HAProxy, for trying out deploy/haproxy.cfg.

    python scripts/cluster.py [-n 2] [--port 3000] [-- MINIVAULT ARGS...]
    make cluster N=2 ARGS="--max-batch 4"

Replicas listen on the ports after --port (3001, 3002, ...), each with its own log
(logs/replica-3001.jsonl, ...); HAProxy listens on --port with deploy/haproxy.cfg
rendered for them. Ctrl-C (or SIGTERM) stops it cleanly: HAProxy stops accepting and
lets open streams finish, the replicas drain (--shutdown-timeout), then all exit.

The tests and bench/scaleout.py use render_haproxy_config and HAProxy from here, so
they run the shipped directives.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


def render_haproxy_config(listen: str, replica_ports: list[int], check_interval: str | None = None,
                          admin_socket: str | None = None) -> str:
    """deploy/haproxy.cfg with its bind address, one server line per replica port, and
    optionally a shorter health-check interval and an admin socket (for tests)."""
    text = HAPROXY_CFG.read_text()

    def sub(pattern: str, replacement, text: str) -> str:
        text, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
        assert count == 1, f"deploy/haproxy.cfg no longer has a line matching {pattern!r}"
        return text

    text = sub(r"^(\s*bind )\S+", lambda m: m[1] + listen, text)
    servers = "".join(f"    server replica{i} 127.0.0.1:{port}\n" for i, port in enumerate(replica_ports, 1))
    text = sub(r"^(\s*server replica\d+ .*\n)+", servers, text)
    if check_interval:
        text = sub(r"(^\s*default-server .*\binter )\S+", lambda m: m[1] + check_interval, text)
    if admin_socket:
        text = sub(r"^global\n", f"global\n    stats socket {admin_socket} level admin\n", text)
    return text


def find_binary(name: str) -> str | None:
    """A program's path; Debian puts haproxy and nginx in /usr/sbin, off a user's PATH."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def free_port() -> int:
    """A port nothing listens on now, for a child process to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until something accepts on 127.0.0.1:port; fails early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"process exited with {proc.returncode} before opening port {port}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.05)


class HAProxy:
    """HAProxy in the foreground (-db) as a child process, with deploy/haproxy.cfg rendered
    for `replica_ports` and listening on 127.0.0.1:port; its files live in `folder`."""

    def __init__(self, replica_ports: list[int], port: int, folder, check_interval: str | None = None,
                 admin: bool = False, log=None):
        self.folder = pathlib.Path(folder)
        self.port = port
        self.admin_socket = self.folder / "admin.sock"
        cfg = self.folder / "haproxy.cfg"
        cfg.write_text(render_haproxy_config(f"127.0.0.1:{port}", replica_ports, check_interval,
                                             str(self.admin_socket) if admin else None))
        self.log_path = self.folder / "haproxy.log"
        out = log or open(self.log_path, "ab")
        # Its own session: a Ctrl-C meant for the caller must not stop it mid-stream.
        self.proc = subprocess.Popen([find_binary("haproxy") or "haproxy", "-db", "-f", str(cfg)],
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(port, self.proc)

    def command(self, line: str) -> str:
        """One command on the admin socket (started with admin=True)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            return b"".join(iter(lambda: sock.recv(65536), b"")).decode()

    def server_status(self) -> dict[str, str]:
        """Each replica's health as HAProxy sees it: UP, DOWN, or a transition ("UP 1/2")."""
        rows = csv.DictReader(self.command("show stat").lstrip("# ").splitlines())
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "replicas"
                and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, server: str, status: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.server_status().get(server) != status:
            assert time.monotonic() < deadline, f"HAProxy never saw {server} {status}: {self.server_status()}"
            time.sleep(0.05)

    def stop(self, sig=signal.SIGUSR1) -> None:
        """SIGUSR1: stop accepting and exit once the open streams end, which a draining
        replica bounds (--shutdown-timeout); SIGTERM: at once."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--replicas", type=int, default=2)
    p.add_argument("--port", type=int, default=3000, help="HAProxy's port; replicas take the next ones")
    p.add_argument("minivault_args", nargs=argparse.REMAINDER, help="after --: passed to every replica")
    args = p.parse_args()
    extra = [a for a in args.minivault_args if a != "--"]
    ports = [args.port + i for i in range(1, args.replicas + 1)]
    (ROOT / "logs").mkdir(exist_ok=True)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="minivault-cluster-"))
    replicas, haproxy = [], None

    def stop_on_signal(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too: a shell starts a background job with SIGINT ignored, which Python keeps.
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    try:
        for port in ports:
            # Own sessions: the Ctrl-C is ours to handle, and they drain when we say so.
            replicas.append(subprocess.Popen(
                [sys.executable, str(ROOT / "minivault.py"), "--port", str(port),
                 "--log-file", str(ROOT / "logs" / f"replica-{port}.jsonl"), *extra],
                cwd=ROOT, start_new_session=True))
        haproxy = HAProxy(ports, args.port, folder, log=sys.stdout)
        print(f"cluster: http://127.0.0.1:{args.port}/ -> {len(ports)} replicas on ports "
              f"{ports[0]}-{ports[-1]} (logs/replica-PORT.jsonl); Ctrl-C stops", file=sys.stderr, flush=True)
        haproxy.proc.wait()
        print(f"cluster: haproxy exited with {haproxy.proc.returncode}", file=sys.stderr)
    except KeyboardInterrupt:
        print("cluster: stopping (open streams finish first)", file=sys.stderr, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not leave orphans
            signal.signal(sig, signal.SIG_IGN)
        for replica in replicas:
            replica.send_signal(signal.SIGTERM)  # drain: finish open streams, refuse new ones
        if haproxy is not None:
            haproxy.stop()
        for replica in replicas:
            replica.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
