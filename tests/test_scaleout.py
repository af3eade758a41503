"""Replicas behind a real HAProxy and a real nginx (Debian's packages; `make test` installs them).

Two replicas of a tiny random GPT-2 run as real processes on loopback. HAProxy runs
deploy/haproxy.cfg as scripts/cluster.py renders it: the replicas' ports, an admin
socket to read the servers' state, and health checks every 200 ms instead of 2 s (so
that a restart takes a second, not several); every other directive is the shipped one.
nginx runs deploy/nginx.conf with the replicas' ports.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from minivault import build_parser
from serverproc import ServerProcess, _Reader, iter_chunks, read_response, send_request

sys.path.insert(0, str(ROOT / "scripts"))
from cluster import HAProxy, find_binary, free_port, wait_port  # noqa: E402

HAPROXY = find_binary("haproxy")
NGINX = find_binary("nginx")
needs_haproxy = pytest.mark.skipif(not HAPROXY, reason="haproxy is not installed (make test installs "
                                   "Debian's: apt-get install haproxy)")
needs_nginx = pytest.mark.skipif(not NGINX, reason="nginx is not installed (make test installs Debian's: "
                                 "apt-get install nginx)")
CHECK_INTERVAL = "200ms"
QUEUE_OF_ONE = ["--queue-size", "1", "--max-batch", "1"]


@pytest.fixture(scope="module")
def endless_gpt2_folder(tiny_gpt2_folder, tmp_path_factory):
    """The tiny GPT-2 with no end-of-sequence token and a 4096-token context: every stream
    runs to its max_tokens, so each test decides how long its streams last."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("endless-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_folder)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    config = GPT2Config.from_pretrained(tiny_gpt2_folder, n_positions=4096, eos_token_id=None, bos_token_id=None)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    return folder


class Replicas:
    """Two replica processes whose ports stay the same across restarts."""

    def __init__(self, model_folder, log_folder):
        self.model_folder = model_folder
        self.log_folder = log_folder
        self.extra_args = [[], []]
        self.procs = [self._start(i) for i in range(2)]
        for proc in self.procs:
            proc.wait_ready()
        self.ports = [proc.port for proc in self.procs]
        self.haproxy: HAProxy | None = None  # restarts wait until HAProxy sees the replica up

    def _start(self, i: int, port: int = 0) -> ServerProcess:
        # One torch thread each: the tiny model gains nothing from more, and with one per
        # core a replica that restarts starves while its peer streams (idle threads spin).
        return ServerProcess(["--model", str(self.model_folder), "--dtype", "float32", *self.extra_args[i]],
                             log_file=self.log_folder / f"replica{i + 1}.jsonl", port=port,
                             env={"OMP_NUM_THREADS": "1"})

    def restart(self, i: int, extra_args: list[str] | None = None) -> None:
        """SIGTERM replica i (it drains), start it again on its port, wait until it serves."""
        if self.procs[i].proc.poll() is None:
            assert self.procs[i].stop() == 0, self.procs[i].stderr
        if extra_args is not None:
            self.extra_args[i] = extra_args
        self.procs[i] = self._start(i, self.ports[i])
        self.procs[i].wait_ready()
        if self.haproxy is not None:
            self.haproxy.wait_status(f"replica{i + 1}", "UP")

    def use(self, *extra_args: list[str]) -> None:
        """Replica i running with extra_args[i] (restarted only when it is not)."""
        for i, args in enumerate(extra_args):
            if self.procs[i].proc.poll() is not None or self.extra_args[i] != args:
                self.restart(i, args)

    def active(self) -> list[int]:
        return [proc.request("GET", "/health").json()["active"] for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture(scope="module")
def replicas(endless_gpt2_folder, tmp_path_factory):
    group = Replicas(endless_gpt2_folder, tmp_path_factory.mktemp("replica-logs"))
    yield group
    group.stop()


@pytest.fixture(scope="module")
def haproxy(replicas, tmp_path_factory):
    proxy = HAProxy(replicas.ports, free_port(), tmp_path_factory.mktemp("haproxy"),
                    check_interval=CHECK_INTERVAL, admin=True)
    replicas.haproxy = proxy
    for i in range(2):
        proxy.wait_status(f"replica{i + 1}", "UP")
    yield proxy
    replicas.haproxy = None
    proxy.stop(signal.SIGTERM)


class Stream:
    """A streaming POST /generate, read object by object as the proxy passes it on.
    Proxies may regroup chunks, so NDJSON lines are split from the bytes, not the chunks."""

    def __init__(self, port: int, max_tokens: int, prompt: str = "The quick brown fox"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        send_request(self.sock, "POST", "/generate", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        self.reader = _Reader(self.sock)
        self.status: int | None = None
        self.reads = 0  # chunks received
        self._objects = None

    def _iter_objects(self):
        pending = b""
        for chunk in iter_chunks(self.reader):
            self.reads += 1
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from (json.loads(line) for line in lines)
        assert pending == b"", "the stream ended inside a line"

    def next(self) -> dict:
        if self._objects is None:
            self.status = read_response(self.sock, self.reader, head_only=True).status
            assert self.status == 200
            self._objects = self._iter_objects()
        return next(self._objects)

    def rest(self) -> list[dict]:
        """Every object up to the end of the body (ConnectionError if it is cut short)."""
        if self._objects is None:
            return [self.next(), *self._objects]
        return list(self._objects)

    def close(self) -> None:
        self.sock.close()


def completes(port: int, max_tokens: int) -> str:
    """'ok' when a streamed request through `port` ends with all its tokens, else what happened."""
    stream = Stream(port, max_tokens)
    try:
        final = stream.rest()[-1]
    except (OSError, AssertionError, ValueError) as exc:
        return f"status {stream.status}: {exc!r}"
    finally:
        stream.close()
    return "ok" if final.get("done") and final["eval_count"] == max_tokens else f"ended with {final}"


def assert_streams_as_generated(port: int, replicas: Replicas) -> None:
    """Tokens reach the client while the replica is still generating. The whole reply
    (150 tokens, about 3 KB) is smaller than one proxy buffer (HAProxy 16 KB, nginx 4-8 KB),
    so a proxy that buffered would pass nothing on until the end."""
    stream = Stream(port, max_tokens=150)
    try:
        first = stream.next()
        assert "response" in first and not first.get("done")
        assert sum(replicas.active()) == 1, "the first token came only after the reply ended"
        objects = [first, *stream.rest()]
    finally:
        stream.close()
    assert objects[-1]["done"] and objects[-1]["eval_count"] == 150
    assert stream.reads > 1


def queue_rejections(proc: ServerProcess) -> float:
    families = {f.name: f for f in text_string_to_metric_families(proc.request("GET", "/metrics").body.decode())}
    return families["minivault_queue_rejections"].samples[0].value


# ---- Kubernetes -----------------------------------------------------------------------


def test_kubernetes_manifest_fits_the_server():
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:2] == ["python", "minivault.py"]
    args = build_parser().parse_args(container["command"][2:])  # every flag is one the server knows
    # SIGKILL must not come before the preStop pause and the drain are over.
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.shutdown_timeout
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["httpHeaders"] == [{"name": "Host", "value": "localhost"}]
    assert container["ports"][0]["containerPort"] == args.port and args.host == "0.0.0.0"
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


# ---- HAProxy --------------------------------------------------------------------------


@needs_haproxy
def test_shipped_haproxy_config_is_valid():
    check = subprocess.run([HAPROXY, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_haproxy
def test_tokens_pass_through_haproxy_as_they_are_generated(replicas, haproxy):
    replicas.use([], [])
    assert_streams_as_generated(haproxy.port, replicas)


@needs_haproxy
def test_rolling_restart_under_streaming_clients_fails_no_request(replicas, haproxy):
    replicas.use([], [])
    outcomes: list[str] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            outcomes.append(completes(haproxy.port, max_tokens=40))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        for i in range(2):
            # Told to stop while it streams: those streams must finish, the rest go elsewhere.
            replicas.procs[i].wait_health("active", 1)
            replicas.restart(i)
    finally:
        done.set()
        for thread in clients:
            thread.join(120)
    assert [o for o in outcomes if o != "ok"] == []
    assert len(outcomes) >= 8  # the clients kept streaming all along


@needs_haproxy
def test_a_full_replicas_503s_are_retried_on_the_other(replicas, haproxy):
    replicas.use(QUEUE_OF_ONE, [])
    full = replicas.procs[0]
    # Fill replica1 directly: one stream decoding, then one waiting in its queue of one.
    held, streams = [Stream(full.port, max_tokens=4000)], []
    try:
        full.wait_health("active", 1)
        held.append(Stream(full.port, max_tokens=4000))
        full.wait_health("queued", 1)
        assert full.request("POST", "/generate", {"prompt": "x", "max_tokens": 1}).status == 503
        before = queue_rejections(full)
        # Each stream stays open while the next is sent, so leastconn sends every one after
        # the first to the replica with fewer of HAProxy's streams: the full one. Its 503
        # is retried on the other, and the client never sees it.
        for _ in range(3):
            streams.append(Stream(haproxy.port, max_tokens=30))
            streams[-1].next()
        finals = [s.rest()[-1] for s in streams]
    finally:
        for s in held + streams:
            s.close()
    assert all(f["done"] and f["eval_count"] == 30 for f in finals)
    assert queue_rejections(full) - before >= 2


@needs_haproxy
def test_a_killed_replica_costs_only_its_own_streams(replicas, haproxy):
    replicas.use([], [])
    # Each stream is open before the next is sent: leastconn puts two on each replica.
    # 500 tokens: all four still stream when the kill comes.
    streams = []
    for _ in range(4):
        streams.append(Stream(haproxy.port, max_tokens=500))
        streams[-1].next()
    assert replicas.active() == [2, 2]
    victim = replicas.procs[0]
    victim.proc.kill()
    victim.proc.wait()

    cut, finished = 0, 0
    for stream in streams:
        try:
            final = stream.rest()[-1]
            assert final["done"] and final["eval_count"] == 500
            finished += 1
        except ConnectionError:
            cut += 1
        finally:
            stream.close()
    assert (cut, finished) == (2, 2)
    # New requests at once: refused by the dead replica and retried on the other, before and
    # after HAProxy's checks take it out (fall 2 x 200 ms).
    assert [completes(haproxy.port, max_tokens=10) for _ in range(4)] == ["ok"] * 4
    haproxy.wait_status("replica1", "DOWN")
    assert [completes(haproxy.port, max_tokens=10) for _ in range(2)] == ["ok"] * 2


# ---- nginx ----------------------------------------------------------------------------


class Nginx:
    """deploy/nginx.conf inside a minimal main configuration, as a foreground child process
    with its pid, logs and temporary files in `folder`."""

    def __init__(self, folder, site: str):
        folder.mkdir()
        (folder / "minivault.conf").write_text(site)
        temp_paths = "".join(f"    {kind}_temp_path {folder / kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.main = folder / "nginx.conf"
        self.main.write_text(f"pid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'};\nevents {{}}\n"
                             f"http {{\n    access_log {folder / 'access.log'};\n{temp_paths}"
                             f"    include {folder / 'minivault.conf'};\n}}\n")
        self.proc: subprocess.Popen | None = None

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run([NGINX, "-t", "-c", str(self.main)], capture_output=True, text=True)

    def start(self, port: int) -> None:
        self.proc = subprocess.Popen([NGINX, "-c", str(self.main), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@needs_nginx
def test_nginx_config_is_valid_and_streams_unbuffered(replicas, tmp_path):
    replicas.use([], [])
    shipped = (ROOT / "deploy" / "nginx.conf").read_text()
    # As shipped: `nginx -t` parses it without connecting to the upstreams.
    result = Nginx(tmp_path / "as-shipped", shipped).check()
    assert result.returncode == 0, result.stderr

    port = free_port()
    site = shipped.replace("listen 127.0.0.1:3000;", f"listen 127.0.0.1:{port};")
    for shipped_port, replica_port in zip((3001, 3002), replicas.ports):
        site = site.replace(f"server 127.0.0.1:{shipped_port} ", f"server 127.0.0.1:{replica_port} ")
    assert f"listen 127.0.0.1:{port};" in site and all(f"127.0.0.1:{p} " in site for p in replicas.ports)
    nginx = Nginx(tmp_path / "live", site)
    assert nginx.check().returncode == 0
    nginx.start(port)
    try:
        assert_streams_as_generated(port, replicas)
    finally:
        nginx.stop()
