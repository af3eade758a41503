"""How many tokens a second the scheduler and the HTTP layer can carry when the model
is as fast as a GPU's: the real server, with a stand-in runner whose decode step only
waits (as a GPU step does, without the GIL) and returns random logits.

    .venv/bin/python bench/engine_rate.py [--step-ms 5] [--clients 1,64,256] [--tokens 128] [--vocab 512]

For each client count it prints the aggregate tok/s against the ceiling (clients per
step), TTFT and inter-token p50/p95, the model thread's own time per step outside the
model (sampling, detokenising, stop strings, handing text to the event loop), and the
event loop's CPU per token (it shares the GIL with the model thread).
Issue 13's goal is 20,000 tok/s over 256 streams; a CUDA-graph step of the embedded
model took 5.1 ms at 256 rows on an H100, so the scheduler's share must stay well
under that. Sampling is timed apart: here the CPU samples the 49,152-token logits,
which on a GPU are the device's work (the host only launches the ops); "the rest" is
the host's own work per step (taking tokens, detokenising, stop strings, handing text
to the event loop, while the event loop writes to the sockets).

`--device queued` models a GPU's asynchrony: a step returns at once and runs for
--step-ms from its launch, and sampling waits for it where a GPU's .cpu() does (the
engine then hands text off while the step computes); `queued-late` is the same device
with the hand-off at the end of each step, as before; `pipelined` is `queued` with the
engine launching step N+1 from step N's sampled tokens before it reads them (as beside
the GPU's static runner), so the host's work on step N overlaps step N+1.

`--vocab 512` makes the logits 512 tokens wide (the repeat penalty's ids folded into
them), so that sampling's tensor work is small, as on a GPU, and its host share (the
settings, the penalty ids, launching the ops) is what remains: the tok/s then show what
the server carries end to end beside a GPU-fast step.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

VOCAB = 49152  # the embedded model's


class PacedRunner:
    """The runner interface with no model: each step waits `step_s` and returns random
    logits (never the end token)."""

    architecture = "llama"
    dtype = "paced"
    device = "cpu"
    parameters = 0
    context_length = 8192

    def __init__(self, codec, step_s: float, vocab: int = VOCAB, queued: bool = False):
        import torch

        self.torch = torch
        self.codec = codec
        self.eos_ids = frozenset({codec.eos_token_id})
        self.step_s = step_s
        # One fixed set of logits (random over the first 512 tokens, the end token never):
        # making 49,152 random numbers a row each step would cost more than the step.
        self.fixed = torch.full((1024, vocab), -30.0)
        self.fixed[:, :512] = torch.randn(1024, 512)
        self.fixed[:, sorted(self.eos_ids)] = -float("inf")
        self.lengths: list[int] = []
        # queued: a step returns at once and runs for step_s from its launch, one after
        # another, as a GPU's queued kernels do; sampling waits for it where a GPU's
        # .cpu() does (serve() hooks that in).
        self.queued = queued
        self.ready_at = 0.0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _logits(self, rows: int):
        return self.fixed[:rows]

    def _wait(self) -> None:
        if self.queued:
            self.ready_at = max(time.perf_counter(), self.ready_at) + self.step_s
        else:
            time.sleep(self.step_s)

    def remember_prefix(self, ids):
        pass

    def prefill(self, prompts):
        self._wait()
        self.lengths += [len(p) for p in prompts]
        return self._logits(len(prompts))

    def begin(self, prompt):
        return prompt

    def advance(self, partial, tokens):
        return self.prefill([partial])

    def decode(self, tokens):
        self._wait()
        self.lengths = [n + 1 for n in self.lengths]
        return self._logits(len(tokens))

    def keep(self, rows):
        self.lengths = [self.lengths[r] for r in rows]

    def reset(self):
        self.lengths = []

    def begin_embedding(self, ids):
        return [ids, 0]  # the input, and its tokens computed so far

    def advance_embedding(self, partial, tokens):
        self._wait()
        partial[1] += tokens
        return [0.0] if partial[1] >= len(partial[0]) else None


def serve(port: int, step_ms: float, max_batch: int, vocab: int, device: str) -> None:
    """The real server (minivault.main) with the paced runner in place of a model."""
    import minivault
    import runner
    from gpu import copy_description
    from prompts import TextCodec

    folder = Path(tempfile.mkdtemp())
    copy_description(folder)
    paced = PacedRunner(TextCodec.from_folder(folder), step_ms / 1000, vocab, queued=device != "sync")
    paced.asynchronous = device in ("queued", "pipelined")  # "queued-late": it hands off as beside a CPU
    paced.pipelined = device == "pipelined"
    runner.load_runner = lambda *args, **kwargs: paced
    import sampling

    if paced.queued:
        real_sample_rows = sampling.sample_rows

        def sample_rows(logits, samplers, before_waiting=None):
            def wait():  # where a GPU's .cpu() waits for the step
                if before_waiting is not None:
                    before_waiting()
                time.sleep(max(0.0, paced.ready_at - time.perf_counter()))
            return real_sample_rows(logits, samplers, before_waiting=wait)
        sampling.sample_rows = sample_rows

        real_launch, real_read = sampling.launch_rows, sampling.Sampled.read

        def launch_rows(logits, samplers):
            sampled = real_launch(logits, samplers)
            sampled.ready_at = paced.ready_at  # the end of the step these logits are of
            return sampled

        def read(sampled):  # where a GPU's .cpu() waits for that step (not one launched since)
            time.sleep(max(0.0, getattr(sampled, "ready_at", 0.0) - time.perf_counter()))
            return real_read(sampled)
        sampling.launch_rows, sampling.Sampled.read = launch_rows, read

    if vocab < VOCAB:  # the prompts' ids fall outside narrow logits: fold them in
        ids = sampling._ids
        sampling._ids = lambda rows, device: ids(rows, device) % vocab

    sys.exit(minivault.main(["--port", str(port), "--log-file", "", "--max-batch", str(max_batch),
                             "--model", str(ROOT / "bench" / "data" / "smollm2-135m"), "--log-level", "warning"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--clients", default="1,64,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=VOCAB, help="the stand-in logits' width")
    parser.add_argument("--device", choices=["sync", "queued", "queued-late", "pipelined"], default="sync",
                        help="sync: a step waits in decode; queued: it runs from its launch while the host goes "
                             "on and sampling waits for it, as on a GPU (the engine hands text off meanwhile); "
                             "queued-late: the same, with the engine handing off at the end of each step; "
                             "pipelined: queued, each step launched from the last one's tokens before they are read")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server side, in its own process
    parser.add_argument("--max-batch", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    if args.serve:
        serve(args.serve, args.step_ms, args.max_batch, args.vocab, args.device)
        return
    from gpu import (event_loop_cpu_s, event_loop_line, free_port, load, model_thread_account, per_step, split_line,
                     ttft_line, wait_healthy)

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--step-ms", str(args.step_ms),
                             "--max-batch", str(max(clients)), "--vocab", str(args.vocab),
                             "--device", args.device], cwd=ROOT)
    try:
        model = wait_healthy(proc, port)["model"]
        asyncio.run(load(port, model, 1, 8))

        print(f"decode step {args.step_ms} ms ({args.device}), logits {args.vocab} wide, "
              f"{args.tokens} tokens a client, OpenAI "
              f"/v1/completions streamed over HTTP, default sampling (top-k 40, top-p 0.9, repeat penalty 1.1)")
        print("host work a step: the model thread's time per decode step (its /metrics) beyond the stand-in "
              "steps (decode) and prefills, and idle waits; of it, sampling and the rest (detokenising, stop "
              "strings, the hand-back)" + ("; queued: sampling includes waiting for the step" if args.device != "sync"
                                          else ""))
        print(f"{'clients':>8} {'tok/s':>9} {'ceiling':>9} {'TTFT p50/p95 ms':>18} {'ITL p50/p95 ms':>16} "
              f"{'host work a step ms':>20} {'sampling':>9} {'the rest':>9}")
        for n in clients:
            before, loop_before = model_thread_account(port), event_loop_cpu_s(proc.pid)
            r = asyncio.run(load(port, model, n, args.tokens))
            loop_after = event_loop_cpu_s(proc.pid)
            account = per_step(before, model_thread_account(port))
            split = account["ms"]
            host = sum(ms for stage, ms in split.items() if stage not in ("decode", "prefill", "waiting"))
            sampling = split.get("sampling", 0.0)
            ceiling = n / (args.step_ms / 1000)
            print(f"{n:8d} {r['tok_s']:9.0f} {ceiling:9.0f} {r['ttft50']:8.1f} / {r['ttft95']:6.1f} "
                  f"{r['itl50']:7.2f} / {r['itl95']:6.2f} {host:20.2f} {sampling:9.2f} {host - sampling:9.2f}",
                  flush=True)
            print("         " + split_line(account), flush=True)
            print("         " + ttft_line(r, account), flush=True)
            print("         " + event_loop_line(loop_before, loop_after, r["tokens"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
