"""RemoteModel: an OpenAI-compatible endpoint behind Model's interface (what it serves, how requests for it are
written per engine, its tokenizer), and how an endpoint is recognised."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import httpx

from localqwen.constants import NATIVE_CONTEXT, THINKING_WRAP_UP_MESSAGE, THINKING_WRAP_UP_TEXT
from localqwen.constrain import AnswerFormat
from localqwen.errors import BadRequest, RemoteError
from localqwen.generation import Limits, Turn
from localqwen.remote.streams import RemoteStream
from localqwen.remote.wire import CONNECT_TIMEOUT_S, get_json, json_of, send
from localqwen.sampling import Sampling

Engine = Literal["localqwen", "llamacpp", "vllm", "openai"]
# /v1/models' `owned_by` names the engine behind an endpoint.
ENGINES: dict[str, Engine] = {"localqwen": "localqwen", "llamacpp": "llamacpp", "vllm": "vllm"}
# The request field that gives a reply a thinking budget, by engine; the others get one from the client.
BUDGET_FIELDS: dict[Engine, str] = {"localqwen": "thinking_budget", "llamacpp": "reasoning_budget_tokens"}
# Between two bytes of a reply: a CPU engine may think about a long prompt for minutes before its first token.
READ_TIMEOUT_S = 600.0
# Generations an engine is taken to run at once when it does not say (llama-server's /props does): `serve
# --upstream` counts requests beyond them as waiting, for its queue's bound.
DEFAULT_PARALLEL = 8
HUGE = 1 << 62  # no limit of localqwen's own: the engine enforces max_tokens and its context


@dataclass(frozen=True)
class Endpoint:
    """What an endpoint says about itself: the engine, the served model's id, its context and vocabulary, and the
    request field for a thinking budget (None: the client enforces budgets)."""

    engine: Engine
    model_id: str
    n_ctx: int | None  # per request (per slot on llama-server); None when the endpoint does not say
    n_vocab: int | None
    sampling: Sampling  # the engine's defaults where it reports them, else the model card's
    budget_field: str | None = None
    parallel: int | None = None  # slots, where the engine says (llama-server's /props total_slots)


class RemoteModel:
    def __init__(self, url: str, http: httpx.Client, endpoint: Endpoint) -> None:
        self.url, self.endpoint = url, endpoint
        self.model_id, self.sampling = endpoint.model_id, endpoint.sampling
        self._http = http
        self._streams: set[RemoteStream] = set()
        self._streams_lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, *, api_key: str | None = None, model: str | None = None,
                timeout: float = READ_TIMEOUT_S) -> RemoteModel:
        """Connect to an OpenAI-compatible endpoint (with or without its /v1) and find the model it serves: `model`,
        or the only (else the first) one listed."""
        base = url.rstrip("/").removesuffix("/v1").rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise RemoteError("not an http:// or https:// URL", url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        http = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
                            limits=httpx.Limits(max_connections=None))  # the engine bounds its requests itself
        try:
            endpoint = discover(http, base, model)
        except BaseException:
            http.close()
            raise
        return cls(base, http, endpoint)

    # --- what the front ends read -----------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self.endpoint.engine

    @property
    def n_ctx(self) -> int:
        """The context one request may fill; the model's native context when the endpoint does not say."""
        return self.endpoint.n_ctx or NATIVE_CONTEXT

    @property
    def parallel(self) -> int:
        """Generations the engine runs at once: its slots where it says (llama-server), else DEFAULT_PARALLEL."""
        return self.endpoint.parallel or DEFAULT_PARALLEL

    @property
    def running(self) -> int:
        """This backend's generations running now (their HTTP streams open)."""
        with self._streams_lock:
            return len(self._streams)

    @property
    def context_known(self) -> bool:
        return self.endpoint.n_ctx is not None

    @property
    def n_vocab(self) -> int:
        return self.endpoint.n_vocab or HUGE  # unknown: the endpoint checks the ids itself

    @property
    def can_tokenize(self) -> bool:
        """Does the endpoint tokenize (localqwen, llama-server and vLLM do: /tokenize)?"""
        return self.engine != "openai"

    def describe(self, used: int) -> dict[str, str]:
        """Rows for the terminal chat's /show; `used`: the tokens the conversation takes."""
        return {"endpoint": f"{self.url} ({self.engine})", "model": self.model_id,
                "context": (f"{self.n_ctx} tokens, {used} in use" if self.context_known else
                            f"{used} tokens in use; the endpoint does not say its context: assumed {NATIVE_CONTEXT}, "
                            "the model's native one"),
                "tokens": "counted by the endpoint" if self.can_tokenize else
                          "the endpoint has no /tokenize: context use is taken from the last reply's usage"}

    # --- tokens ------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text` by the endpoint's tokenizer. vLLM's always reads special-token text as special."""
        if self.engine == "vllm":
            body: dict[str, Any] = {"model": self.model_id, "prompt": text, "add_special_tokens": False}
        else:
            body = {"content": text, "parse_special": special, "add_special": False}
        return self._tokens(self._post_json("/tokenize", body))

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The endpoint's text of `tokens` (`special` is Model's keyword: engines show control tokens their way)."""
        data = self._post_json("/detokenize", {"model": self.model_id, "tokens": list(tokens)})
        return str(data.get("content", data.get("prompt", "")))

    def tokenize_chat(self, messages: list[Any], tools: list[Any] | None = None) -> list[int]:
        """The prompt tokens the endpoint makes of `messages` with its chat template."""
        if self.engine == "llamacpp":  # its /tokenize takes text only: render with its template first
            prompt = self._post_json("/apply-template", {"messages": messages, "tools": tools or []}).get("prompt")
            if not isinstance(prompt, str):
                raise RemoteError("/apply-template gave no prompt", self.url)
            return self._tokens(self._post_json("/tokenize", {"content": prompt, "parse_special": True}))
        return self._tokens(self._post_json("/tokenize", {"model": self.model_id, "messages": messages,
                                                          "tools": tools, "add_generation_prompt": True}))

    def _tokens(self, data: dict[str, Any]) -> list[int]:
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise RemoteError("/tokenize gave no token list", self.url)
        return tokens

    # --- generation ----------------------------------------------------------------------------------------------

    def chat(self, messages: list[Any], *, tools: list[Any] | None = None, tool_choice: str = "auto",
             parallel_tool_calls: bool = True, schema: Any = None, max_tokens: int | None = None,
             thinking_budget: int | None = None, answer_reserve: int | None = None, stop: str | list[str] | None = None,
             wait: float | None = None, **sampling: Any) -> RemoteStream:
        """Stream the reply to `messages` as events (`for` or `async for`), as Model.chat does. The request goes out
        with the first event asked for, and an error the endpoint answers with (a prompt too long, a wrong key)
        raises there. `tool_choice`, `parallel_tool_calls` and `schema` go to the engine as OpenAI's `tool_choice`,
        `parallel_tool_calls` and `response_format` (the engine enforces them; Reply.collect parses and validates
        the answer). `wait` is accepted for Model's signature: the engine queues requests itself."""
        body, turn = self._chat_body(messages, tools, max_tokens, thinking_budget, answer_reserve, stop, sampling)
        body.update(tool_choice_field(tool_choice, tools))
        if not parallel_tool_calls:
            body["parallel_tool_calls"] = False
        answer_format = answer_fields(body, schema)
        return RemoteStream(self, "/v1/chat/completions", body, turn, messages, tools, answer_format)

    def generate(self, prompt: Sequence[int], *, schema: Any = None, max_tokens: int | None = None,
                 thinking_budget: int | None = None, answer_reserve: int | None = None, thinking: bool = True,
                 stop: str | list[str] | None = None, wait: float | None = None, **sampling: Any) -> RemoteStream:
        """A raw completion of prompt tokens (/v1/completions), as Model.generate; `thinking`: the prompt leaves the
        model inside `<think>`. Stop strings and the schema go to the engine (a raw prompt has no thinking apart)."""
        if thinking_budget is not None:
            raise BadRequest("a thinking budget needs a chat request: raw completions have no thinking apart")
        body = {"model": self.model_id, "prompt": list(prompt), "stream": True, **self._sampling_fields(sampling)}
        answer_format = answer_fields(body, schema)
        body["stream_options"] = {"include_usage": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops:
            body["stop"] = stops
        return RemoteStream(self, "/v1/completions", body, Turn(len(prompt), Limits(HUGE, HUGE), thinking=thinking,
                                                                stops=stops), answer_format=answer_format)

    achat = chat  # the same stream serves `async for`, as a local model's does

    def cancel(self) -> None:
        """Stop every running stream of this backend (from any thread): each ends with finish reason "cancelled"."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.cancel()

    def close(self) -> None:
        self.cancel()
        self._http.close()

    @functools.cached_property
    def wrap_up_tokens(self) -> int:
        """Tokens of the thinking wrap-up, by the endpoint's tokenizer."""
        return len(self.tokenize(THINKING_WRAP_UP_TEXT, special=True))

    def _chat_body(self, messages: list[Any], tools: list[Any] | None, max_tokens: int | None,
                   thinking_budget: int | None, answer_reserve: int | None, stop: str | list[str] | None,
                   sampling: dict[str, Any]) -> tuple[dict[str, Any], Turn]:
        """The request body for the engine, and the Turn that reads its reply: with the stop strings and the thinking
        limit the engine does not apply itself (the stream applies them)."""
        if not messages:
            raise BadRequest("at least one message is needed")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        body: dict[str, Any] = {"model": self.model_id, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}, **self._sampling_fields(sampling)}
        if tools:
            body["tools"] = tools
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.engine == "localqwen" and stops:  # the same semantics server-side: it stops at once, usage exact
            body["stop"] = stops
        budget = self.endpoint.budget_field
        if budget == "thinking_budget":  # localqwen plans the budget and the answer reserve itself
            Limits.for_reply(room=HUGE, max_tokens=max_tokens, thinking_budget=thinking_budget,
                             answer_reserve=answer_reserve, wrap_up_tokens=0)  # the same checks of the values
            body.update({"thinking_budget": thinking_budget} if thinking_budget is not None else {})
            return body, Turn(0, Limits(HUGE, HUGE), thinking=True, stops=stops)
        # A thinking budget, or localqwen's answer reserve when only max_tokens is given, planned as the local
        # runtime plans it.
        budgeted = thinking_budget is not None or max_tokens is not None
        limits = Limits.for_reply(room=HUGE, max_tokens=max_tokens, thinking_budget=thinking_budget,
                                  answer_reserve=answer_reserve,
                                  wrap_up_tokens=self.wrap_up_tokens if budgeted and self.can_tokenize else 0)
        budgeted = budgeted and limits.thinking < limits.total
        if budgeted and budget == "reasoning_budget_tokens":
            # llama-server counts the template's "\n" after <think> (the prompt's last token) against the budget.
            body["reasoning_budget_tokens"] = limits.thinking + 1 if limits.thinking else 0
            body["reasoning_budget_message"] = THINKING_WRAP_UP_MESSAGE
            return body, Turn(0, Limits(HUGE, HUGE), thinking=True, stops=stops)
        if budgeted and not self.can_tokenize:
            raise BadRequest(f"{self.url} has neither a per-request thinking budget nor a tokenizer to enforce one "
                             "with: leave thinking_budget (and max_tokens) unset there")
        # Enforced here (vLLM): the stream stops at the budget and the reply goes on as a raw completion after the
        # thinking so far and the wrap-up, as the local runtime's second phase does.
        return body, Turn(0, Limits(HUGE, limits.thinking if budgeted else HUGE), thinking=True, stops=stops)

    def _sampling_fields(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """The sampling the caller set (checked as a local model checks it); unset ones are the engine's defaults."""
        self.sampling.with_overrides(**sampling)
        return {k: v for k, v in sampling.items() if v is not None}

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = self._http.build_request("POST", path, json=body)
        return json_of(send(self._http, request, self.url + path), self.url + path)

    def _track(self, stream: RemoteStream, running: bool) -> None:
        with self._streams_lock:
            (self._streams.add if running else self._streams.discard)(stream)


def tool_choice_field(tool_choice: str, tools: list[Any] | None) -> dict[str, Any]:
    """OpenAI's `tool_choice` for Model.chat's: a mode, or a tool's name (then a named function)."""
    if tool_choice == "auto":
        return {}
    if tool_choice in ("required", "none"):
        return {"tool_choice": tool_choice}
    if tool_choice not in {tool.get("function", tool).get("name") for tool in tools or []}:
        raise BadRequest(f"tool_choice {tool_choice!r} is not among the tools")
    return {"tool_choice": {"type": "function", "function": {"name": tool_choice}}}


def answer_fields(body: dict[str, Any], schema: Any) -> AnswerFormat | None:
    """Put an answer schema (a JSON Schema, or a pydantic model class) in `body` as OpenAI's `response_format`; the
    format Reply.collect parses the answer with. The engine enforces it: no grammar is made here."""
    if schema is None:
        return None
    model = None
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        model, schema = schema, schema.model_json_schema()
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                      "strict": True}}
    return AnswerFormat("", schema, model)


def discover(http: httpx.Client, base: str, model: str | None) -> Endpoint:
    """Read /v1/models (and /props where the engine has it) into an Endpoint."""
    listed = get_json(http, base, "/v1/models").get("data")
    if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in listed):
        raise RemoteError("/v1/models did not list models", base)
    if not listed:
        raise RemoteError("serves no model (/v1/models is empty)", base)
    ids = [m["id"] for m in listed]
    if model is not None and model not in ids:
        raise RemoteError(f"does not serve {model!r}: it serves {', '.join(ids)}", base)
    card = listed[ids.index(model)] if model is not None else listed[0]
    engine = ENGINES.get(str(card.get("owned_by")), "openai")
    meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
    n_ctx = card.get("context_length") or card.get("max_model_len") or meta.get("n_ctx")
    props: dict[str, Any] = {}
    if engine in ("localqwen", "llamacpp"):
        props = get_json(http, base, "/props")
    slots = props.get("total_slots")
    return Endpoint(engine, card["id"], n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None,
                    meta.get("n_vocab") if isinstance(meta.get("n_vocab"), int) else None, engine_sampling(props),
                    BUDGET_FIELDS.get(engine), slots if isinstance(slots, int) and slots > 0 else None)


def engine_sampling(props: dict[str, Any]) -> Sampling:
    """The sampling defaults /props reports (localqwen: `sampling`; llama.cpp: `default_generation_settings.params`);
    the model card's when there are none, or when they are not values localqwen accepts."""
    reported = props.get("sampling") or (props.get("default_generation_settings") or {}).get("params") or {}
    names = {f.name for f in fields(Sampling)} - {"seed"}
    try:
        return Sampling(**{k: v for k, v in reported.items() if k in names})
    except (BadRequest, TypeError):
        return Sampling()
