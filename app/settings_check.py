"""Whether per-model settings can generate at all with a given model, and how to make them.

The engine needs room for the prompt: ``max_new_tokens`` must be below the context length,
and a context longer than the model was trained for only produces noise. These checks run
before settings are saved (the settings dialog) and after a model loads (the main window), so
no saved state leaves every reply failing. Pure, no Qt.
"""

from __future__ import annotations

from dataclasses import replace

from app.settings import ModelSettings

MIN_PROMPT_TOKENS = 16  # the least room a prompt needs next to the reply


def most_reply_tokens(context_length: int) -> int:
    """The longest reply a context leaves room for, next to a short prompt."""
    return max(1, context_length - min(MIN_PROMPT_TOKENS, context_length // 2))


def generation_problem(settings: ModelSettings, max_context: int | None) -> str:
    """Why these settings cannot generate with a model of ``max_context``; "" when they can."""
    context, reply = settings.context_length, settings.max_new_tokens
    most = most_reply_tokens(context)
    if max_context and context > max_context:
        return (
            f"The context length ({context}) is above this model's maximum ({max_context} "
            "tokens). Lower it."
        )
    if reply > most:
        return (
            f"Max reply tokens ({reply}) must leave room for the prompt in the context "
            f"({context} tokens): use at most {most}, or a longer context."
        )
    return ""


def fit_to_model(settings: ModelSettings, max_context: int | None) -> tuple[ModelSettings, str]:
    """Settings lowered until they can generate, and a note saying what changed ("" if none)."""
    notes = []
    fitted = settings
    if max_context and fitted.context_length > max_context:
        notes.append(
            f"context length {fitted.context_length} -> {max_context} (this model's maximum)"
        )
        fitted = replace(fitted, context_length=max_context)
    if fitted.max_new_tokens > most_reply_tokens(fitted.context_length):
        reply = max(1, fitted.context_length // 2)
        notes.append(f"max reply tokens {fitted.max_new_tokens} -> {reply} (room for the prompt)")
        fitted = replace(fitted, max_new_tokens=reply)
    if not notes:
        return settings, ""
    return fitted, "Adjusted so replies can be generated: " + "; ".join(notes) + "."
