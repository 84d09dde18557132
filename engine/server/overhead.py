"""Server overhead, measured: ``python -m engine.server.overhead [--model DIR] [--rounds N]``.

One model on one engine; in interleaved rounds the same greedy text completion runs in-process
(``Engine.generate``, timed from the event callback) and through the server (one streaming
HTTP client in its own process, as another tool would be, on loopback, timed where the client
reads each chunk). Reported per path: decode
speed (tokens after the first over the time from the first to the last token) and time to the
first token from the moment the request is made; then, round by round, the speed ratio and
the first-token difference (medians and ranges: on a busy machine the spread is the news).
Torch runs with one thread unless ``--threads`` says otherwise. Prints Markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import torch

from engine.config import GenerateRequest, LoadConfig, SamplingConfig
from engine.events import Event, TokenReceived
from engine.options import resolve_model_dir
from engine.runtime.engine import Engine
from engine.server import ServedModel, ServerConfig, ServerHandle

PROMPT = "Once upon a time, in a small village by the sea, there lived"


@dataclass(frozen=True)
class Timing:
    """One generation: when the request was made, and when each token reached the caller."""

    tokens: int
    first_s: float  # request made -> first token
    decode_tokens_per_s: float


def timing(started: float, stamps: list[float], tokens: int) -> Timing:
    if not stamps:
        return Timing(tokens, 0.0, 0.0)
    span = stamps[-1] - stamps[0]
    speed = (tokens - 1) / span if tokens > 1 and span > 0 else 0.0
    return Timing(tokens, stamps[0] - started, speed)


def in_process(engine: Engine, request: GenerateRequest) -> Timing:
    stamps: list[float] = []

    def sink(event: Event) -> None:
        if isinstance(event, TokenReceived):
            stamps.append(time.perf_counter())

    started = time.perf_counter()
    finished = engine.generate(request, sink).result()
    return timing(started, stamps, len(finished.token_ids))


def through_server(client: httpx.Client, body: dict[str, Any]) -> Timing:
    stamps: list[float] = []
    tokens = 0
    started = time.perf_counter()
    with client.stream("POST", "/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return timing(started, stamps, tokens)


def client_rounds(url: str, body: dict[str, Any], rounds: int) -> list[Timing]:
    """In the client process: one streaming request per call of ``next``."""
    with httpx.Client(base_url=url, timeout=600) as client:
        return [through_server(client, body) for _ in range(rounds)]


def summary(timings: list[Timing]) -> dict[str, float]:
    return {
        "tokens": statistics.median(t.tokens for t in timings),
        "first_token_ms": statistics.median(t.first_s for t in timings) * 1000,
        "decode_tokens_per_s": statistics.median(t.decode_tokens_per_s for t in timings),
    }


def measure(model_dir: Path, rounds: int, max_tokens: int, device: str) -> dict[str, Any]:
    config = LoadConfig(model_dir, device=cast(Any, device))
    sampling = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=max_tokens)
    request = GenerateRequest(prompt=PROMPT, sampling=sampling)
    body = {
        "model": model_dir.name,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    engine = Engine()
    try:
        engine.load(config, lambda event: None).result()
        model = ServedModel(model_dir.name, config.context_length, live=config.live)
        spawn = multiprocessing.get_context("spawn")
        with (
            ServerHandle(engine, model, ServerConfig(port=0)) as server,
            ProcessPoolExecutor(1, mp_context=spawn) as client,
        ):
            in_process(engine, request)  # warm-up, not counted
            client.submit(client_rounds, server.url, body, 1).result()
            local, served = [], []
            for _ in range(rounds):
                local.append(in_process(engine, request))
                served += client.submit(client_rounds, server.url, body, 1).result()
    finally:
        engine.shutdown()
    return {"in_process": summary(local), "server": summary(served), **paired(local, served)}


def paired(local: list[Timing], served: list[Timing]) -> dict[str, Any]:
    """Round by round (the two ran back to back): speed ratio and first-token difference."""
    ratios = [
        there.decode_tokens_per_s / here.decode_tokens_per_s
        for here, there in zip(local, served, strict=True)
        if here.decode_tokens_per_s
    ]
    extra_ms = [
        (there.first_s - here.first_s) * 1000 for here, there in zip(local, served, strict=True)
    ]
    return {
        "speed_ratio": statistics.median(ratios) if ratios else 0.0,
        "speed_ratio_range": [min(ratios, default=0.0), max(ratios, default=0.0)],
        "first_token_extra_ms": statistics.median(extra_ms),
        "first_token_extra_ms_range": [min(extra_ms), max(extra_ms)],
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {
        **result,
        "model": Path(args.model_dir).name,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(data: dict[str, Any]) -> str:
    local, served = data["in_process"], data["server"]
    return "\n".join(
        [
            "| path | decode tok/s | first token (ms) | tokens |",
            "|---|---|---|---|",
            f"| in-process | {local['decode_tokens_per_s']:.1f} | {local['first_token_ms']:.1f} "
            f"| {local['tokens']:.0f} |",
            f"| server, 1 streaming client | {served['decode_tokens_per_s']:.1f} "
            f"| {served['first_token_ms']:.1f} | {served['tokens']:.0f} |",
            "",
            f"server/in-process speed, median of paired rounds: {data['speed_ratio']:.3f} "
            f"(rounds {data['speed_ratio_range'][0]:.3f}-{data['speed_ratio_range'][1]:.3f}); "
            f"first token through the server {data['first_token_extra_ms']:+.1f} ms "
            f"(rounds {data['first_token_extra_ms_range'][0]:+.1f} to "
            f"{data['first_token_extra_ms_range'][1]:+.1f}) "
            f"({data['model']}, {data['device']}, {data['threads']} thread(s), "
            f"{data['rounds']} interleaved rounds, {data['max_tokens']} tokens, {data['date']})",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.server.overhead", description=__doc__)
    parser.add_argument("--model", dest="model_dir", type=Path, help="default: built-in model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model_dir = resolve_model_dir(args.model_dir)
    result = measure(args.model_dir, args.rounds, args.max_tokens, args.device)
    data = report(result, args)
    print(markdown(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(data), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
