"""Routes beside the dialects: health, the model's properties (what a chat page needs to set itself up), and
tokenization.

    GET  /health       no key needed; shows only whether the server is busy
    GET  /props        no key needed (a page asks for one when this says so): the model, its context, default
                       sampling and output budget, thinking-effort budgets, whether a running completion's thinking
                       can be ended (answer_now)
    POST /tokenize     {"content": text} or {"messages": [...], "tools": [...]} -> {"tokens": [...], "count": n}
    POST /detokenize   {"tokens": [...]} -> {"content": text}

Text given to /tokenize is tokenized as text: special-token strings stay characters unless the caller asks for
`"parse_special": true`. Messages go through the chat template exactly as a chat request's would.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from localqwen.constants import DEFAULT_MAX_TOKENS
from localqwen.remote import RemoteModel
from localqwen.server.http import APIError
from localqwen.server.openai import REASONING_EFFORT, Message, Strict, Tool
from localqwen.server.state import ServerState

router = APIRouter()


class TokenizeRequest(Strict):
    content: str | None = None
    parse_special: bool = False
    messages: list[Message] | None = None
    tools: list[Tool] | None = None


class DetokenizeRequest(Strict):
    tokens: list[int] = Field(max_length=1 << 20)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    scheduler = server.scheduler
    return {"status": "ok", "model": server.model_id, "generating": scheduler.running > 0,
            "running": scheduler.running, "waiting": scheduler.waiting, "slots": server.model.parallel}


@router.get("/props")
async def props(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    model = server.model
    sampling = {k: v for k, v in model.sampling.to_dict().items() if k != "seed"}
    return {"model": server.model_id, "context_length": model.n_ctx, "sampling": sampling,
            "max_tokens": DEFAULT_MAX_TOKENS, "reasoning_effort": REASONING_EFFORT,
            "answer_now": not isinstance(model, RemoteModel) or model.can_tokenize,  # POST .../{id}/answer-now
            "api_key_required": server.api_key is not None}


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    req = await server.read(request, TokenizeRequest)
    if (req.content is None) == (req.messages is None):
        raise APIError(400, "send either content (text) or messages (a chat), not both", param="content")
    if req.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
        tokens = server.model.tokenize_chat([m.for_template() for m in req.messages], tools)
    else:
        tokens = server.model.tokenize(req.content or "", special=req.parse_special)
    return {"tokens": tokens, "count": len(tokens)}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    server = ServerState.of(request)
    req = await server.read(request, DetokenizeRequest)
    if not all(0 <= t < server.model.n_vocab for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {server.model.n_vocab})", param="tokens")
    return {"content": server.model.detokenize(req.tokens, special=True)}
