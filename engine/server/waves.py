"""Waves of concurrent streaming clients, and the server's footprint after each:
``python -m engine.server.waves [--model DIR] [--clients 50] [--waves 5]``.

The server runs in this process over the loaded model; each wave's clients (one HTTP
connection each, all streaming at once) run in a separate process, so only the server's
memory is measured. After every wave, once garbage is collected, ``footprint`` counts what a
leak would leave behind: resident memory, Python's allocated blocks and objects, live
generations, tasks on the server's loop, open connections and the queue. Stable counts over
the waves mean nothing piles up per request. Prints Markdown, and JSON with every wave.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import httpx

from engine.atomic import write_text_atomic
from engine.server.machine import machine_facts
from engine.server.runner import ServerHandle
from engine.server.scheduler import Generation

STATM = Path("/proc/self/statm")


@dataclass(frozen=True)
class Footprint:
    """What the server process holds after a wave (memory in bytes; 0 where the OS hides it)."""

    rss_bytes: int
    peak_rss_bytes: int
    python_blocks: int  # sys.getallocatedblocks() after a collection
    python_objects: int  # objects the garbage collector tracks
    generations: int  # this server's scheduler.Generation objects still alive
    tasks: int  # tasks on the server's event loop
    connections: int
    running: int
    waiting: int


def rss_bytes() -> int:
    """Resident memory of this process now (Linux), else 0."""
    try:
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The most resident memory this process has had (where ``resource`` exists), else 0."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def footprint(handle: ServerHandle, settle_s: float = 3.0) -> Footprint:
    """Collect garbage, then count (call between waves, when no client is connected).

    A client may have its last byte before the server and the engine thread have let go of its
    request; up to ``settle_s`` is given for that, then what is left is counted.
    """
    deadline = time.monotonic() + settle_s
    while True:
        seen = _count(handle)
        idle = seen.generations == seen.connections == seen.running == 0
        if idle or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def _count(handle: ServerHandle) -> Footprint:
    gc.collect()
    state = handle.routes.gate.state()
    objects = gc.get_objects()
    return Footprint(
        rss_bytes=rss_bytes(),
        peak_rss_bytes=peak_rss_bytes(),
        python_blocks=sys.getallocatedblocks(),
        python_objects=len(objects),
        generations=sum(type(item) is Generation and item.loop is handle.loop for item in objects),
        tasks=handle.tasks(),
        connections=handle.connections(),
        running=state.running,
        waiting=state.waiting,
    )


async def _one_client(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text, done = [], False
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    text.append(choice.get("delta", {}).get("content") or "")
    return {"status": response.status_code, "done": done, "text": "".join(text)}


async def _wave(url: str, model: str, prompts: Sequence[str], max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        jobs = [_one_client(client, model, prompt, max_tokens) for prompt in prompts]
        return list(await asyncio.gather(*jobs))


def wave(url: str, model: str, prompts: Sequence[str], max_tokens: int) -> list[dict]:
    """One wave: every prompt streamed at once on its own connection; each client's result.

    The clients' event loop runs on a thread of its own, so a caller whose thread already
    has a running loop (an app, or a test after one) can call this too.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _wave(url, model, prompts, max_tokens)).result()


def prompts_for(clients: int, wave_index: int) -> list[str]:
    return [f"Client {i} of wave {wave_index}: name a colour." for i in range(clients)]


def run_waves(args: argparse.Namespace) -> dict[str, Any]:
    from engine.config import LoadConfig
    from engine.runtime.engine import Engine
    from engine.server import ServedModel, ServerConfig

    config = LoadConfig(args.model_dir, device=cast(Any, args.device))
    engine = Engine()
    try:
        engine.load(config, lambda event: None).result()
        model = ServedModel(args.model_dir.name, config.context_length, live=config.live)
        spawn = multiprocessing.get_context("spawn")
        with (
            ServerHandle(engine, model, ServerConfig(port=0)) as server,
            ProcessPoolExecutor(1, mp_context=spawn) as pool,
        ):
            rows = [{"wave": 0, "completed": 0, **asdict(footprint(server))}]
            for index in range(1, args.waves + 1):
                prompts = prompts_for(args.clients, index)
                results = pool.submit(wave, server.url, model.model_id, prompts, args.max_tokens)
                done = sum(r["done"] and r["status"] == 200 for r in results.result())
                rows.append({"wave": index, "completed": done, **asdict(footprint(server))})
                print(f"wave {index}: {done} of {args.clients} completed", file=sys.stderr)
    finally:
        engine.shutdown()
    return {"waves": rows}


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "| wave | clients completed | RSS (MiB) | peak RSS (MiB) | Python blocks | objects "
        "| generations alive | loop tasks | connections |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["waves"]:
        lines.append(
            f"| {row['wave']} | {row['completed']} | {row['rss_bytes'] / 2**20:.1f} "
            f"| {row['peak_rss_bytes'] / 2**20:.1f} | {row['python_blocks']} "
            f"| {row['python_objects']} | {row['generations']} | {row['tasks']} "
            f"| {row['connections']} |"
        )
    lines.append(
        f"\n{data['model']}, {data['device']}, {data['clients']} concurrent streaming clients "
        f"per wave, {data['max_tokens']} tokens each, {data['machine']}, load average "
        f"{data['load_before']} before, {data['load_after']} after, {data['date']}"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.server.waves", description=__doc__)
    parser.add_argument("--model", dest="model_dir", type=Path, help="default: built-in model")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.waves < 1 or args.max_tokens < 1:
        parser.error("--clients, --waves and --max-tokens must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from engine.options import resolve_model_dir

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model_dir = resolve_model_dir(args.model_dir)
    load_before = os.getloadavg()
    data = {
        **run_waves(args),
        "model": args.model_dir.name,
        "device": args.device,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        **machine_facts(load_before),
    }
    print(markdown(data))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
