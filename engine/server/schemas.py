"""Pydantic models of the OpenAI requests the server accepts, and their translation into the
engine's ``GenerateRequest``.

Fields the engine cannot honour (``n`` > 1, logprobs, tools, images, a JSON response format,
logit bias, presence or frequency penalties) are refused with a clear message rather than
silently ignored; fields that make no difference here (``user``, ``metadata``, ``store``) are
accepted and ignored, as other OpenAI-compatible servers do. Sampling follows
OpenAI's meaning: temperature 0 is greedy, and no top-k or repetition penalty is added.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from engine.config import ALPHA_MAX, ChatMessage, GenerateRequest, LiveOptions, SamplingConfig
from engine.server.config import ServedModel
from engine.server.errors import ApiError

MAX_STOP_STRINGS = 4
Number = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class UnderstudyOptions(Strict):
    """The namespaced extras: this request's alpha and policy."""

    alpha: Annotated[Number, Field(ge=0.0, le=ALPHA_MAX)] | None = None
    policy: Literal["lru", "lfu", "smoe"] | None = None


class StreamOptions(Strict):
    include_usage: StrictBool = False


class SamplingFields(Strict):
    """What chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    understudy: UnderstudyOptions | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None


def _refuse_unsupported(body: SamplingFields) -> None:
    """What would change the answer but the engine cannot do: refused, never ignored."""
    if body.n > 1:
        raise ApiError(400, f"n is {body.n}: this server makes one choice per request.", "n")
    if body.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by this server.", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported by this server; leave it at 0.", name)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this server.", "logit_bias")
    if isinstance(body, ChatCompletionRequest):
        _refuse_unsupported_chat(body)
    if isinstance(body, CompletionRequest) and (body.echo or body.suffix):
        raise ApiError(400, "echo and suffix are not supported.", "echo")
    if isinstance(body, CompletionRequest) and (body.best_of or 1) > 1:
        raise ApiError(400, "best_of above 1 is not supported.", "best_of")


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    if body.tools or body.functions:
        raise ApiError(400, "Tools (function calling) are not supported.", "tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice is not supported (no tools).", "tool_choice")
    kind = body.response_format.get("type") if isinstance(body.response_format, dict) else None
    if body.response_format is not None and kind != "text":
        raise ApiError(
            400,
            "Only the text response format is supported (no JSON mode or schema).",
            "response_format",
        )


def _max_tokens(requested: int | None, model: ServedModel, default: int, param: str) -> int:
    if requested is None:
        return min(default, model.context_length)
    if requested > model.context_length:
        raise ApiError(
            400,
            f"{param} is {requested}, more than the model's context length "
            f"({model.context_length} tokens).",
            param,
        )
    return requested


def sampling_for(body: SamplingFields, max_tokens: int) -> SamplingConfig:
    """OpenAI sampling: temperature 1 and top-p 1 by default, 0 means greedy, no top-k."""
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise ApiError(400, "Stop strings must not be empty.", "stop")
    return SamplingConfig(
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=max_tokens,
        stop=tuple(stop),
        greedy=temperature == 0.0,
        seed=body.seed,
    )


def live_for(body: SamplingFields, model: ServedModel) -> LiveOptions | None:
    """This request's live options, or None to use the engine's own."""
    extras = body.understudy
    if extras is None or (extras.alpha is None and extras.policy is None):
        return None
    base = model.live
    policy = extras.policy or base.policy
    alpha = base.alpha if extras.alpha is None else extras.alpha
    live = LiveOptions(policy=policy, alpha=alpha, eviction=base.eviction)
    if live.substitution_on and not model.substitution_supported:
        raise ApiError(400, "This model does not substitute experts; use alpha 0.", "understudy")
    return live


def _chat_messages(body: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    messages = []
    for message in body.messages:
        role = "system" if message.role == "developer" else message.role
        messages.append(ChatMessage(role, message.text()))
    if not any(m.content.strip() for m in messages if m.role == "user"):
        raise ApiError(400, "The messages need at least one user message with text.", "messages")
    return tuple(messages)


def _prompt(body: CompletionRequest) -> str:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "Give exactly one prompt (batches are not supported).", "prompt")
    if not prompts[0].strip():
        raise ApiError(400, "The prompt is empty.", "prompt")
    return prompts[0]


def check_model(body: SamplingFields, model: ServedModel) -> None:
    if body.model != model.model_id:
        raise ApiError(
            404,
            f"The model {body.model!r} does not exist; this server serves {model.model_id!r}.",
            "model",
            "model_not_found",
        )


def chat_request(body: ChatCompletionRequest, model: ServedModel, default: int) -> GenerateRequest:
    """A validated chat body as the engine's request (errors are ``ApiError``)."""
    check_model(body, model)
    _refuse_unsupported(body)
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    sampling = sampling_for(body, _max_tokens(requested, model, default, param))
    live = live_for(body, model)
    return GenerateRequest(messages=_chat_messages(body), sampling=sampling, live=live)


def completion_request(
    body: CompletionRequest, model: ServedModel, default: int
) -> GenerateRequest:
    """A validated text-completion body as the engine's request; 16 tokens by default."""
    check_model(body, model)
    _refuse_unsupported(body)
    sampling = sampling_for(body, _max_tokens(body.max_tokens, model, default, "max_tokens"))
    return GenerateRequest(prompt=_prompt(body), sampling=sampling, live=live_for(body, model))
