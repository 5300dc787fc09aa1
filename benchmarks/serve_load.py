"""Load test of `alignloop serve`: 32 concurrent streaming clients against 1, and a burst beyond its queue.

Starts the real server (`python -m alignloop serve --model bench=MODEL --port P --max-queue Q …`) in a
subprocess, then runs three scenarios of streamed chat completions (`max_tokens` each, usage included):
  1 client   — requests one after another (what a server without batching does at best);
  32 clients — all at once, each sending its requests back to back (the scheduler batches them);
               the single client sends a quarter as many requests (one at a time they take long;
               tokens per second are compared, not wall times);
  burst      — `--burst` requests at once (default 2 × (max batch + max queue)): those that find the
               queue full must be answered 429 in OpenAI's shape (code queue_full), every other one
               must complete.
Every stream must end with a finish reason, a usage chunk and `[DONE]`. Prints throughput (completion
tokens per second of wall time), its ratio 32 clients / 1 client, time to first token (p50 / p95), and
the burst's counts; writes them as JSON with `--out`. Exits 1 when a stream fails or the burst sees
any failure other than 429.

    python benchmarks/serve_load.py                       # builds a micro run in a temporary folder
    python benchmarks/serve_load.py --model runs/x/sft --clients 32 --requests 4 --max-tokens 64 --out serve.json
    python benchmarks/serve_load.py --min-tokens 8 --max-tokens 128   # answers of mixed lengths
    python benchmarks/serve_load.py --clients 4 --requests 1 --max-tokens 8 --max-batch 4 --max-queue 4 --burst 24
                                                          # a quick check that it works (no figures to keep)
    python benchmarks/serve_load.py --min-tokens 8 --max-tokens 128 --no-burst
                                      # from a worktree of an older commit (copy this script there): its server
                                      # may lack --max-queue and the other tuning flags; those are left out
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
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


class Refused(Exception):
    """The server answered with an error status instead of a stream."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, finish, usage, done = None, None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            try:
                err = r.json()
            except ValueError:
                err = {"text": r.text[:200]}
            raise Refused(r.status_code, err)
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


async def scenario(url: str, clients: int, requests: int, max_tokens: int, min_tokens: int = 0) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def worker(w: int):
            out = []
            for k in range(requests):
                # --min-tokens: answers of mixed lengths (the same draw for request k of client w in every run)
                n = random.Random(w * 1009 + k).randint(min_tokens, max_tokens) if min_tokens else max_tokens
                out.append(await one_stream(client, url, PROMPTS[(w + k) % len(PROMPTS)], n))
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


async def burst(url: str, n: int, max_tokens: int) -> dict:
    """`n` streams at once: how many complete, how many are refused with OpenAI's 429 (queue_full), and
    every other outcome, which should not happen."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        async def one(i: int) -> str:
            try:
                await one_stream(client, url, PROMPTS[i % len(PROMPTS)], max_tokens)
                return "completed"
            except Refused as e:
                err = e.body.get("error") or {}
                if e.status == 429 and set(err) == {"message", "type", "param", "code"} and err["code"] == "queue_full":
                    return "queue_full"
                return f"HTTP {e.status}: {e.body}"
            except Exception as e:  # noqa: BLE001 — counted and shown: nothing else should fail
                return f"{type(e).__name__}: {e}"
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    failures = [o for o in outcomes if o not in ("completed", "queue_full")]
    return {"requests": n, "completed": outcomes.count("completed"), "refused_429": outcomes.count("queue_full"),
            "other_failures": len(failures), "failure_examples": sorted(set(failures))[:5], "wall_s": round(wall, 3)}


def server_flags(args, n_burst: int) -> list[str]:
    """The tuning flags this checkout's server has. An older server (run from a worktree of an earlier
    commit to compare against) may lack some: those are left out and said, except --max-queue when the
    burst needs it."""
    help_text = subprocess.run([sys.executable, "-m", "alignloop", "serve", "--help"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    flags = []
    for flag, value in (("--max-queue", args.max_queue), ("--batch-window-ms", args.batch_window_ms),
                        ("--threads", args.threads)):
        if flag in help_text:
            flags += [flag, str(value)]
        elif flag == "--max-queue" and n_burst:
            sys.exit("this server has no --max-queue (no bounded queue): run with --no-burst")
        else:
            print(f"(this server has no {flag}: its own default is used)")
    return flags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a Hugging Face model folder (default: a fresh micro model)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=0, help="> 0: each request's max_tokens drawn from "
                   "[min, max] (answers of mixed lengths, where continuous batching differs from static)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (at least --clients: the "
                   "32-client run must see no 429)")
    p.add_argument("--burst", type=int, default=0, help="requests at once in the burst (0: 2 × (max batch + "
                   "max queue))")
    p.add_argument("--burst-tokens", type=int, default=16, help="max_tokens of each burst request")
    p.add_argument("--no-burst", action="store_true", help="skip the burst")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="the server's --batch-window-ms")
    p.add_argument("--threads", type=int, default=0, help="the server's --threads (0: its default, cores - 1)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if args.max_queue < args.clients:
        p.error("--max-queue must be at least --clients: the concurrent run measures batching, not refusals")
    n_burst = 0 if args.no_burst else args.burst or 2 * (args.max_batch + args.max_queue)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or micro_model(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "alignloop", "serve", "--model", f"bench={model}", "--db", f"sqlite:///{tmp}/b.db",
             "--port", str(port), "--max-batch", str(args.max_batch), *server_flags(args, n_burst)],
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
            # the single client sends a quarter of the crowd's requests: tokens/s are compared, not wall times
            single = asyncio.run(scenario(url, 1, args.clients * args.requests // 4, args.max_tokens, args.min_tokens))
            crowd = asyncio.run(scenario(url, args.clients, args.requests, args.max_tokens, args.min_tokens))
            bursted = asyncio.run(burst(url, n_burst, args.burst_tokens)) if n_burst else None
        finally:
            server.terminate()
            server.wait(30)

    result = {"model": str(args.model or "micro (fresh)"), "max_tokens": args.max_tokens, "max_batch": args.max_batch,
              "max_queue": args.max_queue,
              "batch_window_ms": args.batch_window_ms, "load_average": os.getloadavg(),
              "server_threads": args.threads or max(1, (os.cpu_count() or 2) - 1),
              "cpu": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
              "single": single, "concurrent": crowd, "burst": bursted,
              "speedup": round(crowd["tokens_per_s"] / single["tokens_per_s"], 2)}
    print(f"{'clients':>8} {'streams':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12}")
    for r in (single, crowd):
        print(f"{r['clients']:>8} {r['streams']:>8} {r['tokens']:>7} {r['wall_s']:>7} {r['tokens_per_s']:>8} "
              f"{r['ttft_p50_ms']:>12} {r['ttft_p95_ms']:>12}")
    print(f"batching: {result['speedup']}x the throughput of one client ({args.clients} clients); every stream completed")
    if bursted:
        print(f"burst: {bursted['requests']} streams at once (max batch {args.max_batch}, max queue {args.max_queue}): "
              f"{bursted['completed']} completed, {bursted['refused_429']} answered 429 queue_full, "
              f"{bursted['other_failures']} other failures {bursted['failure_examples'] or ''}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if bursted and bursted["other_failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
