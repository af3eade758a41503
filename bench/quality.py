"""Perplexity of each weight format of our Llama runner, against its float32 path.

The text (bench/data/public_domain.txt: the Declaration of Independence and the
Gettysburg Address) is cut into windows of WINDOW tokens; each window's tokens after
the first are scored given the tokens before them in the window. Also prints the
largest logit difference to float32 over the same positions, and how often the most
likely token differs. Run: .venv/bin/python bench/quality.py [--model M] [dtypes...]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WINDOW = 512
TEXT = ROOT / "bench" / "data" / "public_domain.txt"


def window_logits(runner, ids: list[int]):
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, WINDOW):
            chunk = ids[start:start + WINDOW]
            cache = runner.model.new_cache(rows=1)
            out.append(runner.model.forward(torch.tensor([chunk]), cache, [len(chunk) - 1], every_position=True)[0])
    return out


def perplexity(windows, ids: list[int]) -> float:
    import torch

    nll, count = 0.0, 0
    for w, logits in enumerate(windows):
        chunk = ids[w * WINDOW:(w + 1) * WINDOW]
        targets = torch.tensor(chunk[1:])
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        nll -= float(logp[torch.arange(len(targets)), targets].sum())
        count += len(targets)
    return math.exp(nll / count)


def main() -> None:
    import torch

    from modelsource import resolve_model
    from runner import load_runner

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("dtypes", nargs="*", default=["float16", "int8", "int4", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = resolve_model(args.model)
    text = TEXT.read_text()
    reference = load_runner(source, "float32", "~/.cache/minivault", "llama")
    ids = reference.codec.backend.encode(text, add_special_tokens=False).ids
    base = window_logits(reference, ids)
    base_ppl = perplexity(base, ids)
    print(f"model {source.name}, {len(ids)} tokens of {TEXT.name}, windows of {WINDOW}")
    print(f"{'dtype':10} {'perplexity':>10} {'vs float32':>10} {'top-1 differs':>14} {'max |dlogit|':>12}")
    print(f"{'float32':10} {base_ppl:10.3f} {'1.0000x':>10} {'0 %':>14} {0.0:12.3f}")
    del reference
    for dtype in args.dtypes:
        t0 = time.monotonic()
        runner = load_runner(source, dtype, "~/.cache/minivault", "llama")
        windows = window_logits(runner, ids)
        ppl = perplexity(windows, ids)
        flips = sum(int((a.argmax(-1) != b.argmax(-1)).sum()) for a, b in zip(windows, base))
        worst = max(float((a - b).abs().max()) for a, b in zip(windows, base))
        print(f"{dtype:10} {ppl:10.3f} {ppl / base_ppl:9.4f}x {100 * flips / len(ids):12.2f} % {worst:12.3f}"
              f"   ({time.monotonic() - t0:.1f} s)")
        del runner


if __name__ == "__main__":
    main()
