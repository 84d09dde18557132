"""``python -m engine serve``: load a model on the engine and serve it over the OpenAI API.

The server settings are checked before the model loads (a refused address fails at once).
The API key comes from ``--api-key`` or, better (it stays out of the process list), the
``UNDERSTUDY_API_KEY`` environment variable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from engine.config import LoadConfig
from engine.events import Event, LoadProgressed
from engine.server.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT, ServedModel, ServerConfig
from engine.server.runner import bind, serve_forever, url_of

API_KEY_ENV = "UNDERSTUDY_API_KEY"


def configure_serve(parser: argparse.ArgumentParser) -> None:
    from engine import cli

    cli.add_model_options(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    group.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --host (needs a key)"
    )
    group.add_argument("--api-key", help=f"required Bearer key (or set {API_KEY_ENV})")
    group.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow a web origin"
    )
    group.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N")
    group.add_argument("--default-max-tokens", type=int, default=512, metavar="N")
    group.add_argument("--model-name", help="the model id clients use (default: folder name)")
    group.add_argument("--log-level", default="info", choices=("warning", "info", "debug"))


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allow_remote=args.allow_remote,
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        default_max_tokens=args.default_max_tokens,
    )


def _progress(event: Event) -> None:
    if isinstance(event, LoadProgressed):
        print(f"\r[{event.fraction:4.0%}] {event.message:<60}", end="", file=sys.stderr, flush=True)


def served_model(config: LoadConfig, name: str | None, substitution_supported: bool) -> ServedModel:
    return ServedModel(
        model_id=name or config.model_dir.name,
        context_length=config.context_length,
        substitution_supported=substitution_supported,
        live=config.live,
        created=int(time.time()),
    )


def run_serve(args: argparse.Namespace) -> int:
    from engine import cli
    from engine.options import build_load_config
    from engine.runtime.engine import Engine

    server = server_config(args)
    load = build_load_config(cli.engine_options(args))
    sock = bind(server.host, server.port)  # a taken port fails before the model loads
    engine = Engine()
    try:
        info = engine.load(load, _progress).result()
        print(file=sys.stderr)
        model = served_model(load, args.model_name, info.substitution_supported)
        url = url_of(server.host, sock.getsockname()[1])
        print(f"Serving {model.model_id} at {url}", file=sys.stderr)
        serve_forever(engine, model, server, args.log_level, sock)
    finally:
        engine.shutdown()
        sock.close()
    return 0
