"""The Starlette application: routes, body reading, streaming and non-streaming replies.

``create_app(engine, model, config)`` serves one loaded model through ``EngineAPI``. Requests
are validated (``schemas``), take their turn on the engine (``scheduler.EngineGate``) and are
answered with OpenAI bodies (``responses``). A client that disconnects cancels its generation:
a stream when Starlette stops it, a plain request when its disconnect arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.config import GenerateRequest
from engine.errors import EngineError, EngineOutOfMemoryError, InvalidRequestError
from engine.events import GenerationFinished, StatsSnapshot, TokenReceived
from engine.protocol import EngineAPI
from engine.server import responses as out
from engine.server.config import ServedModel, ServerConfig
from engine.server.errors import (
    ApiError,
    api_error_handler,
    error_body,
    http_error_handler,
    internal_error_handler,
    validation_error,
)
from engine.server.guard import Guard
from engine.server.scheduler import EngineGate, Generation, stats_delta
from engine.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    chat_request,
    completion_request,
)

BodyT = TypeVar("BodyT", bound=BaseModel)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than ``limit`` bytes even without a Content-Length."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"The request body is larger than {limit} bytes.")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"The body is not valid JSON: {error}", code="invalid_json") from error


def parse(model_class: type[BodyT], data: Any) -> BodyT:
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    try:
        return model_class.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from error


def engine_error(error: BaseException) -> ApiError:
    """An engine failure as the error to send; internals never leak."""
    if isinstance(error, InvalidRequestError):
        return ApiError(400, str(error))
    if isinstance(error, EngineOutOfMemoryError):
        return ApiError(503, str(error), code="out_of_memory")
    if isinstance(error, EngineError):
        return ApiError(500, str(error), code=type(error).__name__)
    return ApiError(500, "The engine failed on this request; see the server's log.")


async def until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        continue


class Routes:
    """The route handlers over one engine and one served model."""

    def __init__(self, engine: EngineAPI, model: ServedModel, config: ServerConfig) -> None:
        self.engine, self.served, self.config = engine, model, config
        self.gate = EngineGate(engine)

    def model_card(self) -> dict[str, Any]:
        created = self.served.created
        return {
            "id": self.served.model_id,
            "object": "model",
            "created": created,
            "owned_by": "understudy",
        }

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, request: Request) -> JSONResponse:
        if request.path_params["model_id"] != self.served.model_id:
            raise ApiError(
                404,
                f"The model {request.path_params['model_id']!r} does not exist.",
                "model",
                "model_not_found",
            )
        return JSONResponse(self.model_card())

    async def stats(self, request: Request) -> JSONResponse:
        live = self.served.live
        return JSONResponse(
            {
                "object": "understudy.stats",
                "model": self.served.model_id,
                "live": {"alpha": live.alpha, "policy": live.policy},
                "queue": asdict(self.gate.state()),
                "stats": self.engine.stats().to_dict(),
            }
        )

    async def chat(self, request: Request) -> Response:
        body = parse(ChatCompletionRequest, await read_json(request, self.config.max_body_bytes))
        generate = chat_request(body, self.served, self.config.default_max_tokens)
        return await self._answer(request, body, generate, "chat")

    async def completions(self, request: Request) -> Response:
        body = parse(CompletionRequest, await read_json(request, self.config.max_body_bytes))
        generate = completion_request(body, self.served, COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await self._answer(request, body, generate, "text")

    async def _answer(
        self, request: Request, body: SamplingFields, generate: GenerateRequest, kind: out.Kind
    ) -> Response:
        reply = out.Reply(kind, self.served.model_id, generate.live or self.served.live)
        if body.stream:
            events = self._stream(generate, reply, body.include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self._whole(request, generate, reply)

    async def _whole(
        self, request: Request, generate: GenerateRequest, reply: out.Reply
    ) -> Response:
        """Wait for the turn and the whole reply, or for the client to leave (then cancel)."""
        work = asyncio.ensure_future(self._generate_whole(generate))
        gone = asyncio.ensure_future(until_disconnect(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return Response(status_code=499)
        try:
            finished, stats = work.result()
        except Exception as error:
            raise engine_error(error) from error
        return JSONResponse(out.full_response(reply, finished, stats))

    async def _generate_whole(
        self, generate: GenerateRequest
    ) -> tuple[GenerationFinished, StatsSnapshot]:
        async with self.gate.turn():
            generation = Generation(self.engine, generate)
            try:
                finished = await finish_of(generation)
            finally:
                self._abandon(generation)  # only if it is still running: the client left
        return finished, stats_delta(generation.before, finished.stats)

    def _abandon(self, generation: Generation) -> None:
        """Cancel the generation if it still runs (its client left); counted when it ends."""
        if not generation.job.done():
            generation.cancel()
            generation.job.future.add_done_callback(
                lambda _future: self.gate.count_cancel(generation.made_after_cancel)
            )

    async def _stream(
        self, generate: GenerateRequest, reply: out.Reply, include_usage: bool
    ) -> AsyncIterator[bytes]:
        async with self.gate.turn():
            generation = Generation(self.engine, generate)
            try:
                if reply.kind == "chat":
                    yield out.sse(out.role_chunk(reply))
                async for chunk in self._chunks(generation, reply, include_usage):
                    yield chunk
            finally:
                self._abandon(generation)

    async def _chunks(
        self, generation: Generation, reply: out.Reply, include_usage: bool
    ) -> AsyncIterator[bytes]:
        finished: GenerationFinished | None = None
        try:
            async for event in generation.events():
                if isinstance(event, TokenReceived) and event.text:
                    yield out.sse(out.text_chunk(reply, event.text))
                elif isinstance(event, GenerationFinished):
                    finished = event
        except Exception as error:
            failed = engine_error(error)
            yield out.sse(error_body(failed.status, failed.message, failed.param, failed.code))
            return
        assert finished is not None, "a generation ends with GenerationFinished"
        yield out.sse(
            out.final_chunk(reply, finished, stats_delta(generation.before, finished.stats))
        )
        if include_usage:
            yield out.sse(out.usage_chunk(reply, finished))
        yield out.sse("[DONE]")


async def finish_of(generation: Generation) -> GenerationFinished:
    finished: GenerationFinished | None = None
    async for event in generation.events():
        if isinstance(event, GenerationFinished):
            finished = event
    assert finished is not None, "a generation ends with GenerationFinished"
    return finished


def middleware(config: ServerConfig) -> list[Middleware]:
    stack = [Middleware(Guard, config=config)]
    if config.cors_origins:
        cors = Middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
        stack.insert(0, cors)
    return stack


def create_app(engine: EngineAPI, model: ServedModel, config: ServerConfig) -> Starlette:
    """The ASGI app serving ``model`` from ``engine`` under ``config``'s rules."""
    routes = Routes(engine, model, config)
    handlers: dict[Any, Callable[..., Any]] = {
        ApiError: api_error_handler,
        HTTPException: http_error_handler,
        Exception: internal_error_handler,
    }
    app = Starlette(
        routes=[
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", routes.one_model, methods=["GET"]),
            Route("/v1/chat/completions", routes.chat, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/understudy/stats", routes.stats, methods=["GET"]),
        ],
        middleware=middleware(config),
        exception_handlers=handlers,
    )
    app.state.routes = routes
    return app
