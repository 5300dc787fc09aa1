"""Load test of `alignloop serve`: 32 concurrent streaming clients against 1, on loopback.

Starts the real server (`python -m alignloop serve MODEL --port P`) in a subprocess, then runs two
scenarios with the same requests (streamed chat completions, `max_tokens` each, usage included):
  1 client   — requests one after another (what a server without batching does at best);
  32 clients — all at once, each sending its requests back to back (the scheduler batches them).
Every stream must end with a finish reason, a usage chunk and `[DONE]`. Prints throughput (completion
tokens per second of wall time) and time to first token (p50 / p95), and writes them as JSON.

    python benchmarks/serve_load.py                       # builds a micro run in a temporary folder
    python benchmarks/serve_load.py --model runs/x/sft --clients 32 --requests 4 --max-tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of the first country?", "Tell me about the forest.", "Reverse the word lantern.",
           "What is 12 plus 7?", "Which language do they speak in the north?", "Write one friendly sentence."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micro_model(folder: Path) -> Path:
    run = folder / "run"
    for stage in ("world", "tokenizer", "pretrain"):
        subprocess.run([sys.executable, "-m", "alignloop", stage, "--preset", "micro", "--out", str(run)], cwd=ROOT,
                       check=True, capture_output=True, env={**os.environ, "ALIGNLOOP_QUIET": "1"})
    return run / "pretrain"


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, finish, usage, done = None, None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk["choices"]:
                if c["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
                finish = c["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    end = time.perf_counter() - t0
    if not (done and finish and usage):
        raise RuntimeError(f"incomplete stream: done={done} finish={finish} usage={usage}")
    # an answer that ends at once has no content delta: its first "token" is the end of the stream
    return {"ttft": ttft if ttft is not None else end, "tokens": usage["completion_tokens"], "seconds": end}


async def scenario(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def worker(w: int):
            out = []
            for k in range(requests):
                out.append(await one_stream(client, url, PROMPTS[(w + k) % len(PROMPTS)], max_tokens))
            return out
        t0 = time.perf_counter()
        results = [x for chunk in await asyncio.gather(*(worker(w) for w in range(clients))) for x in chunk]
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "streams": len(results), "completed": len(results), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p95_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
            "mean_tokens_per_stream": round(tokens / len(results), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a Hugging Face model folder (default: a fresh micro model)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="the server's --batch-window-ms")
    p.add_argument("--threads", type=int, default=0, help="the server's --threads (0: its default, cores - 1)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or micro_model(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "alignloop", "serve", "--model", f"bench={model}", "--db", f"sqlite:///{tmp}/b.db",
             "--port", str(port), "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.batch_window_ms),
             "--threads", str(args.threads)],
            cwd=ROOT, stdout=subprocess.DEVNULL,
            env={**os.environ, "ALIGNLOOP_QUIET": "1"})
        try:
            deadline = time.time() + 180
            while True:
                try:
                    httpx.get(url + "/v1/models", timeout=1).raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.time() > deadline:
                        sys.exit("the server did not start")
                    time.sleep(0.2)
            asyncio.run(scenario(url, 4, 1, 8))                          # warm-up
            # the single client sends as many requests as the whole crowd, so both runs do the same work
            single = asyncio.run(scenario(url, 1, args.clients * args.requests // 4, args.max_tokens))
            crowd = asyncio.run(scenario(url, args.clients, args.requests, args.max_tokens))
        finally:
            server.terminate()
            server.wait(30)

    result = {"model": str(args.model or "micro (fresh)"), "max_tokens": args.max_tokens, "max_batch": args.max_batch,
              "batch_window_ms": args.batch_window_ms, "load_average": os.getloadavg(),
              "server_threads": args.threads or max(1, (os.cpu_count() or 2) - 1),
              "cpu": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
              "single": single, "concurrent": crowd,
              "speedup": round(crowd["tokens_per_s"] / single["tokens_per_s"], 2)}
    print(f"{'clients':>8} {'streams':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12}")
    for r in (single, crowd):
        print(f"{r['clients']:>8} {r['streams']:>8} {r['tokens']:>7} {r['wall_s']:>7} {r['tokens_per_s']:>8} "
              f"{r['ttft_p50_ms']:>12} {r['ttft_p95_ms']:>12}")
    print(f"batching: {result['speedup']}x the throughput of one client; every stream completed")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
