"""Per-chunk encoding cost of the HTTP streams: the old way (a dict per chunk and
json.dumps of it, as the front ends did before gateway.http_api.frames) against
the per-stream byte templates, in one run.

    PYTHONPATH=. python bench/bench_http_stream.py [--events N] [--repeats R]

OpenAI: a chat stream's delta chunks with stream_options.include_usage
(``"usage": null`` on each); Ollama: /api/chat's delta lines, each stamped
with the time as before. Each way encodes the same deltas (short tokens, some
with quotes, newlines and non-ASCII text); the best of R runs counts, and the
run checks that both ways give the same bytes.

Last line: ``bench http stream: sse_us_old=A sse_us_new=B ndjson_us_old=C
ndjson_us_new=D sse_ratio=A/B ndjson_ratio=C/D`` (microseconds per event).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.http_api import frames, ollama, openai

TOKENS = [" the", " quick", " brown", " fox", ' "jumps"', "\n", " über", " 漢字", ",", " 🙂"]


def old_sse(head: dict[str, Any], delta: str, completion_tokens: int) -> bytes:
    """The old way: the chunk's dicts, then one json.dumps (include_usage on)."""
    piece = openai._CHAT.piece(delta, None)
    event = {**head, "choices": [piece]}
    return f"data: {json.dumps({**event, 'usage': None})}\n\n".encode()


def old_line(name: str, delta: str) -> bytes:
    """The old way: the line's dicts, then json.dumps."""
    return json.dumps({**ollama._piece("chat", name, delta), "done": False}).encode() + b"\n"


def per_event_us(encode: Callable[[str, int], bytes], deltas: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i, delta in enumerate(deltas):
            encode(delta, i)
        best = min(best, time.perf_counter() - start)
    return best / len(deltas) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    deltas = [TOKENS[i % len(TOKENS)] for i in range(args.events)]
    name = "llava-hf/llava-1.5-7b-hf"
    head: dict[str, Any] = {
        "id": "chatcmpl-3f2b9c1e-0000-4000-8000-1234567890ab",
        "created": 1_760_000_000,
        "model": name,
        "object": openai._CHAT.chunk_object,
    }
    chunks = frames.OpenAIChunks(head, openai._CHAT.piece, last_usage=True, running=False)
    lines = frames.OllamaLines(lambda c, t: ollama._piece("chat", name, c, t))

    def new_sse(delta: str, i: int) -> bytes:
        return chunks.delta(delta, 0, i)

    def new_line(delta: str, i: int) -> bytes:
        return lines.delta(delta, ollama._now())

    for delta in TOKENS:  # the same bytes both ways (Ollama's stamp aside)
        assert new_sse(delta, 1) == old_sse(head, delta, 1), delta
        stamp = ollama._now()
        old = json.dumps({**ollama._piece("chat", name, delta, stamp), "done": False})
        assert lines.delta(delta, stamp) == old.encode() + b"\n", delta

    sse_old = per_event_us(lambda d, i: old_sse(head, d, i), deltas, args.repeats)
    sse_new = per_event_us(new_sse, deltas, args.repeats)
    ndjson_old = per_event_us(lambda d, i: old_line(name, d), deltas, args.repeats)
    ndjson_new = per_event_us(new_line, deltas, args.repeats)
    stamp_us = per_event_us(lambda d, i: ollama._now().encode(), deltas, args.repeats)
    print(f"events={args.events} repeats={args.repeats} (best run); Ollama's per-line time stamp"
          f" alone: {stamp_us:.2f} us, in both ways")  # fmt: skip
    print(
        f"bench http stream: sse_us_old={sse_old:.2f} sse_us_new={sse_new:.2f}"
        f" ndjson_us_old={ndjson_old:.2f} ndjson_us_new={ndjson_new:.2f}"
        f" sse_ratio={sse_old / sse_new:.1f} ndjson_ratio={ndjson_old / ndjson_new:.1f}"
    )


if __name__ == "__main__":
    main()
