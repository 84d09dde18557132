"""Server overhead, measured: ``python -m engine.server.overhead [--model DIR] [--rounds N]``.

One model on one engine, wrapped in an ``EngineClock`` that stamps every text-bearing token as
it leaves the engine thread. In interleaved rounds (the order alternating) the same greedy text
completion runs in-process and through the server, read by one streaming HTTP client in its own
process on loopback that stamps each token when its SSE chunk is read. Two kinds of figures:

- **Delivery** (per served request, both sides of the same generation, so machine noise hits
  both alike): client-observed decode speed over the engine's, client over engine duration
  from request to last token, the first token at the client minus at the engine, and the
  per-token lag.
- **CPU** (thread CPU time, which other jobs on the machine hardly change): what the server's
  thread (event loop: HTTP, JSON, SSE writes) spends per token, as a share of an in-process
  token's time, and the engine thread's CPU per token while serving over in-process.
- **Side by side** (paired rounds, noisy on a busy machine): the engine's own decode speed while
  serving over in-process, the client's over in-process, and the first token's extra delay.

Each figure is reported as median, quartiles and range over the rounds. Torch runs with one
thread unless ``--threads`` says otherwise. Prints Markdown, and JSON with every round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import httpx
import torch

from engine.atomic import write_text_atomic
from engine.config import GenerateRequest, LoadConfig, SamplingConfig
from engine.events import Event, GenerationFinished, TokenReceived
from engine.options import resolve_model_dir
from engine.protocol import EngineAPI, EventSink, Job
from engine.runtime.engine import Engine
from engine.server import ServedModel, ServerConfig, ServerHandle
from engine.server.machine import machine_facts
from engine.server.timing import Trace, best_ratio, delivery, ratios, spread

PROMPT = "Once upon a time, in a small village by the sea, there lived"


class EngineClock:
    """An engine whose generations are timed where tokens leave the engine thread."""

    def __init__(self, engine: EngineAPI) -> None:
        self.engine = engine
        self.last: tuple[float, list[float], list[float], Job[GenerationFinished]] | None = None

    def generate(self, request: GenerateRequest, on_event: EventSink) -> Job[GenerationFinished]:
        stamps: list[float] = []
        cpu: list[float] = []  # the engine thread's CPU time at each stamp

        def sink(event: Event) -> None:
            if isinstance(event, TokenReceived) and event.text:
                stamps.append(time.perf_counter())
                cpu.append(time.thread_time())
            on_event(event)

        asked = time.perf_counter()
        job = self.engine.generate(request, sink)
        self.last = (asked, stamps, cpu, job)
        return job

    def last_trace(self) -> Trace:
        assert self.last is not None, "a generation ran"
        asked, stamps, cpu, job = self.last
        tokens = len(job.result().token_ids)
        return Trace(asked, tuple(stamps), tokens, cpu[-1] - cpu[0] if cpu else 0.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def in_process(clock: EngineClock, request: GenerateRequest) -> Trace:
    clock.generate(request, lambda event: None).result()
    return clock.last_trace()


def through_server(client: httpx.Client, body: dict[str, Any]) -> Trace:
    """One streaming request, each text chunk stamped when read."""
    stamps: list[float] = []
    tokens = 0
    asked = time.perf_counter()
    with client.stream("POST", "/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(now)
    return Trace(asked, tuple(stamps), tokens)


def client_rounds(url: str, body: dict[str, Any], rounds: int) -> list[Trace]:
    """In the client process: ``rounds`` streaming requests, one after the other."""
    with httpx.Client(base_url=url, timeout=600) as client:
        return [through_server(client, body) for _ in range(rounds)]


def requests_for(model_dir: Path, max_tokens: int) -> tuple[GenerateRequest, dict[str, Any]]:
    """The same greedy text completion, as the engine's request and as an HTTP body."""
    sampling = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=max_tokens)
    body = {
        "model": model_dir.name,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return GenerateRequest(prompt=PROMPT, sampling=sampling), body


def measure(model_dir: Path, rounds: int, max_tokens: int, device: str) -> list[dict[str, Any]]:
    """Every round's three traces: in-process, and the server's engine and client sides."""
    config = LoadConfig(model_dir, device=cast(Any, device))
    request, body = requests_for(model_dir, max_tokens)
    engine = Engine()
    clock = EngineClock(engine)
    try:
        engine.load(config, lambda event: None).result()
        model = ServedModel(model_dir.name, config.context_length, live=config.live)
        spawn = multiprocessing.get_context("spawn")
        with (
            ServerHandle(cast(EngineAPI, clock), model, ServerConfig(port=0)) as server,
            ProcessPoolExecutor(1, mp_context=spawn) as client,
        ):

            def served() -> tuple[Trace, Trace, float]:
                before = server.loop_cpu_s()
                (trace,) = client.submit(client_rounds, server.url, body, 1).result()
                return clock.last_trace(), trace, server.loop_cpu_s() - before

            in_process(clock, request)  # warm-up, not counted
            served()
            return [one_round(index, clock, request, served) for index in range(rounds)]
    finally:
        engine.shutdown()


def one_round(index: int, clock: EngineClock, request: GenerateRequest, served: Any) -> dict:
    """In-process and served back to back, the order alternating between rounds."""
    if index % 2:
        engine_side, client_side, server_cpu_s = served()
        local = in_process(clock, request)
    else:
        local = in_process(clock, request)
        engine_side, client_side, server_cpu_s = served()
    print(
        f"round {index + 1}: in-process {local.decode_per_s:.1f} tok/s, through the server "
        f"{client_side.decode_per_s:.1f} tok/s",
        file=sys.stderr,
    )
    return {
        "in_process": local,
        "server_engine": engine_side,
        "server_client": client_side,
        "server_thread": Trace(0.0, (), client_side.tokens, server_cpu_s),
    }


def figures(rounds: list[dict[str, Trace]]) -> dict[str, Any]:
    """The per-request delivery figures and the paired side-by-side ones."""
    local = [r["in_process"] for r in rounds]
    engine_side = [r["server_engine"] for r in rounds]
    client_side = [r["server_client"] for r in rounds]
    deliveries = [delivery(e, c) for e, c in zip(engine_side, client_side, strict=True)]
    local_speed = [t.decode_per_s for t in local]
    server_ms = [
        r["server_thread"].cpu_s * 1000 / max(1, r["server_thread"].tokens) for r in rounds
    ]
    return {
        "cpu": {
            "server_thread_per_token_ms": spread(server_ms),
            "server_thread_share_of_token": spread(
                [ms * speed / 1000 for ms, speed in zip(server_ms, local_speed, strict=True)]
            ),
            "engine_thread_per_token_ms": spread([t.cpu_per_piece_ms for t in local]),
            "engine_thread_serving_over_in_process": spread(
                ratios(
                    [t.cpu_per_piece_ms for t in engine_side],
                    [t.cpu_per_piece_ms for t in local],
                )
            ),
        },
        "tokens": {
            "in_process": spread([t.tokens for t in local]),
            "server": spread([t.tokens for t in client_side]),
            "text_pieces": spread([len(t.stamps) for t in client_side]),
        },
        "delivery": {
            name: spread([getattr(d, name) for d in deliveries])
            for name in deliveries[0].__dataclass_fields__
        },
        "side_by_side": {
            "in_process_decode_per_s": spread(local_speed),
            "serving_engine_decode_per_s": spread([t.decode_per_s for t in engine_side]),
            "client_decode_per_s": spread([t.decode_per_s for t in client_side]),
            "engine_speed_ratio": spread(
                ratios([t.decode_per_s for t in engine_side], local_speed)
            ),
            "client_speed_ratio": spread(
                ratios([t.decode_per_s for t in client_side], local_speed)
            ),
            "client_speed_ratio_best": best_ratio(
                [t.decode_per_s for t in client_side], local_speed
            ),
            "first_token_extra_ms": spread(
                [(c.first_s - t.first_s) * 1000 for t, c in zip(local, client_side, strict=True)]
            ),
        },
    }


def cell(values: dict[str, float], digits: int = 3, sign: str = "") -> str:
    f = f"{{:{sign}.{digits}f}}"
    return (
        f"{f.format(values['median'])} ({f.format(values['q1'])} to {f.format(values['q3'])}; "
        f"{f.format(values['min'])} to {f.format(values['max'])})"
    )


def markdown(data: dict[str, Any]) -> str:
    """The figures as Markdown: median (quartiles; range) over the rounds."""
    d, s, c = data["delivery"], data["side_by_side"], data["cpu"]
    rows = [
        ("server thread CPU per token (ms)", cell(c["server_thread_per_token_ms"], 3)),
        ("... as a share of an in-process token's time", cell(c["server_thread_share_of_token"])),
        ("engine thread CPU per token, in-process (ms)", cell(c["engine_thread_per_token_ms"], 1)),
        (
            "engine thread CPU per token, serving / in-process, paired",
            cell(c["engine_thread_serving_over_in_process"]),
        ),
        ("client decode speed / engine decode speed, same request", cell(d["speed_ratio"])),
        ("client (sent -> last token) / engine (asked -> last token)", cell(d["whole_ratio"])),
        ("first token at client - at engine (ms)", cell(d["first_token_delta_ms"], 1, "+")),
        ("per-token lag, median of each request (ms)", cell(d["lag_median_ms"], 1, "+")),
        ("per-token lag, worst of each request (ms)", cell(d["lag_max_ms"], 1, "+")),
        ("request sent -> engine asked (ms)", cell(d["before_engine_ms"], 1, "+")),
        ("engine decode speed serving / in-process, paired", cell(s["engine_speed_ratio"])),
        ("client decode speed / in-process, paired", cell(s["client_speed_ratio"])),
        ("client / in-process, best round of each", f"{s['client_speed_ratio_best']:.3f}"),
        ("first token, server - in-process, paired (ms)", cell(s["first_token_extra_ms"], 1, "+")),
        ("in-process decode tok/s", cell(s["in_process_decode_per_s"], 1)),
        ("through the server, client decode tok/s", cell(s["client_decode_per_s"], 1)),
    ]
    lines = ["| figure | median (quartiles; range) |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append(
        f"\n{data['model']}, {data['device']}, {data['threads']} torch thread(s), "
        f"{data['rounds']} interleaved rounds of {data['max_tokens']} tokens, "
        f"{data['machine']}, load average {data['load_before']} before, "
        f"{data['load_after']} after, {data['date']}"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.server.overhead", description=__doc__)
    parser.add_argument("--model", dest="model_dir", type=Path, help="default: built-in model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 2:
        parser.error("--rounds must be at least 1 and --max-tokens at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model_dir = resolve_model_dir(args.model_dir)
    load_before = os.getloadavg()
    rounds = measure(args.model_dir, args.rounds, args.max_tokens, args.device)
    data = {
        **figures(rounds),
        "model": Path(args.model_dir).name,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "device": args.device,
        **machine_facts(load_before),
        "traces": [{name: asdict(trace) for name, trace in r.items()} for r in rounds],
    }
    print(markdown(data))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
