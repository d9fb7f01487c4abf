"""Serving: an OpenAI-compatible, continuously batched HTTP server for the cross-attention
VLMs (``tools/serve.py``; see docs/serving.md).

* :mod:`.engine`: the continuously batched generation engine (slot KV caches, the image
  cache, the step broadcast to the other tensor-parallel ranks).
* :mod:`.openai_api`: the Chat Completions schema (request parsing and validation, images
  from data URLs, prompts in Meta's chat format, incremental detokenisation, ``stop``).
* :mod:`.http`: the FastAPI app (``build_app``): routes, server-sent events, errors,
  Prometheus metrics, the chat page (``static/chat.html``).

Nothing heavy is imported here: ``from llama_vision.serving import build_app`` imports
FastAPI on first use, the engine when the app is built.
"""
from __future__ import annotations

from .openai_api import APIError, ChatRequest, TextStream, build_prompt, error_body, parse_chat_request

__all__ = ["APIError", "ChatRequest", "TextStream", "build_app", "build_prompt", "error_body", "parse_chat_request",
           "Engine", "GenerationRequest", "SamplingParams", "RequestStream", "TokenEvent", "QueueFull", "RequestRejected"]

_ENGINE_NAMES = {"Engine", "GenerationRequest", "SamplingParams", "RequestStream", "TokenEvent", "QueueFull", "RequestRejected"}


def __getattr__(name: str):
    if name == "build_app":
        from .http import build_app

        return build_app
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
