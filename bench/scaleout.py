"""What HAProxy in front costs one stream: tokens/s and time to first token, direct and
through deploy/haproxy.cfg, in the same run.

    .venv/bin/python bench/scaleout.py [--max-tokens 128] [--repeats 21] [--pause 0.5] [--torch-threads N]

Starts two replicas of the embedded model and HAProxy in front (scripts/cluster.py),
then sends one greedy streaming request at a time, alternating direct (to each replica
in turn) and through HAProxy, so that drift in the machine's speed hits both sides
alike. Each request comes after a pause, on an idle machine as a lone user's does:
back to back, a request to the replica that served the one before starts faster (its
threads are still awake) and one to the other replica slower (the first one's threads
still spin on the shared cores), which would count for or against HAProxy depending on
the order it happens to pick replicas in. Prints medians and quartiles, the ratio
(goal: under 3% overhead) and the replicas' resident memory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from cluster import HAProxy, find_binary, free_port  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."


def one_stream(port: int, max_tokens: int) -> tuple[float, float]:
    """(time to first token in s, tokens/s after it) for one greedy streaming request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    start = time.perf_counter()
    conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    times, final = [], {}
    while line := resp.readline():
        obj = json.loads(line)
        if obj.get("response"):
            times.append(time.perf_counter())
        final = obj
    conn.close()
    assert final.get("done") and final["eval_count"] == max_tokens, f"answer ended early: {final}"
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0])


def quartiles(values: list[float]) -> list[float]:
    """First quartile, median, third quartile."""
    return statistics.quantiles(values, n=4, method="inclusive")


def resident_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB."""
    fields = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=21, help="requests per side (after one warm-up each)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds of idle before each request")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the replicas (default: torch's, one per core); fewer leaves "
                        "HAProxy and the client a core")
    args = p.parse_args()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="minivault-bench-"))
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None
    replicas = [ServerProcess([], log_file=folder / f"replica{i}.jsonl", env=env) for i in (1, 2)]
    haproxy = None
    try:
        for replica in replicas:
            replica.wait_ready()
        haproxy = HAProxy([r.port for r in replicas], free_port(), folder)
        ports = {"direct": [r.port for r in replicas], "haproxy": [haproxy.port]}
        for port in ports["direct"]:
            one_stream(port, args.max_tokens)  # warm-up: first-request costs are not HAProxy's
        one_stream(haproxy.port, args.max_tokens)
        runs = {"direct": [], "haproxy": []}
        for i in range(args.repeats):
            for side in ("direct", "haproxy"):
                side_ports = ports[side]
                time.sleep(args.pause)
                runs[side].append(one_stream(side_ports[i % len(side_ports)], args.max_tokens))
        version = subprocess.run([find_binary("haproxy"), "-v"], capture_output=True, text=True).stdout.split()[2]
        threads = f"{args.torch_threads} torch threads" if args.torch_threads else "torch threads: one per core"
        dtype = re.search(r"loaded in [\d.]+ s \((\S+) on", replicas[0].stderr)[1]
        print(f"embedded model, 2 replicas (--dtype auto: {dtype}, {threads}), greedy, {args.max_tokens} tokens, "
              f"one stream at a time after {args.pause} s idle, {args.repeats} requests per side alternating, "
              f"127.0.0.1; HAProxy {version} with deploy/haproxy.cfg")
        medians = {}
        for side, results in runs.items():
            ttft = quartiles([r[0] * 1000 for r in results])
            rate = quartiles([r[1] for r in results])
            medians[side] = (ttft[1], rate[1])
            print(f"  {side:8} tokens/s {rate[1]:6.2f} ({rate[0]:.2f}-{rate[2]:.2f})   "
                  f"time to first token {ttft[1]:5.1f} ms ({ttft[0]:.1f}-{ttft[2]:.1f})   (median, quartiles)")
        rate_ratio = medians["haproxy"][1] / medians["direct"][1]
        ttft_ratio = medians["haproxy"][0] / medians["direct"][0]
        print(f"  through HAProxy / direct: tokens/s {rate_ratio:.3f}x, time to first token {ttft_ratio:.3f}x "
              f"(overhead {(1 - rate_ratio) * 100:+.1f}% tokens/s, {(ttft_ratio - 1) * 100:+.1f}% TTFT; "
              f"goal under 3%)")
        for n, replica in enumerate(replicas, 1):
            rss, peak = resident_mb(replica.proc.pid)
            print(f"  replica{n} resident memory {rss:.0f} MB (peak {peak:.0f} MB)")
    finally:
        if haproxy is not None:
            haproxy.stop()
        for replica in replicas:
            replica.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
