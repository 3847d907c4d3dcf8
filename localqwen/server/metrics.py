"""Prometheus metrics of one server (`GET /metrics`, text format, through prometheus_client).

Each app has its own registry, so several apps in one process (tests, embedding apps) count apart. What is counted:

    localqwen_requests_total{endpoint,status}       every HTTP request, by route (its path template) and status
    localqwen_prompt_tokens_total                   prompt tokens of generations, cached ones included
    localqwen_cached_prompt_tokens_total            of those, the ones reused from the KV cache
    localqwen_generated_tokens_total                tokens generated (thinking and answer)
    localqwen_thinking_tokens_total                 of those, thinking tokens
    localqwen_queue_depth                           requests waiting for the model
    localqwen_running_generations                   generations running
    localqwen_time_to_first_token_seconds           histogram: prompt evaluation and the first token
    localqwen_generation_tokens_per_second          histogram: decoding speed of each generation (2+ tokens)

A request that reaches no route (a 404, a 405) counts under endpoint "unmatched" (so random paths add no labels); a
stream counts when it ends, with the status it started with. /metrics needs the API key when the server has one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localqwen.events import Event, Stats
from localqwen.server.runs import Scheduler
from localqwen.server.state import ServerState

FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 400, 800)
router = APIRouter()


class Metrics:
    """The counters of one app, and the two hooks that feed them: `watch` (a generation's events) and
    `CountRequests` (every HTTP request)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("localqwen_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("localqwen_prompt_tokens", "Prompt tokens of generations", registry=registry)
        self.cached_prompt_tokens = Counter("localqwen_cached_prompt_tokens",
                                            "Prompt tokens reused from the KV cache", registry=registry)
        self.generated_tokens = Counter("localqwen_generated_tokens", "Tokens generated (thinking and answer)",
                                        registry=registry)
        self.thinking_tokens = Counter("localqwen_thinking_tokens", "Thinking tokens generated", registry=registry)
        Gauge("localqwen_queue_depth", "Requests waiting for the model", registry=registry).set_function(
            lambda: scheduler.waiting)
        Gauge("localqwen_running_generations", "Generations running", registry=registry).set_function(
            lambda: scheduler.running)
        self.first_token = Histogram("localqwen_time_to_first_token_seconds",
                                     "Prompt evaluation and first token, per generation",
                                     buckets=FIRST_TOKEN_BUCKETS, registry=registry)
        self.tokens_per_s = Histogram("localqwen_generation_tokens_per_second", "Decoding speed per generation",
                                      buckets=TOKENS_PER_S_BUCKETS, registry=registry)

    @staticmethod
    def of(request: Request) -> Metrics:
        return request.app.state.metrics

    def observe(self, event: Event) -> None:
        """Sees each event of every generation; a done event's totals are counted."""
        if event.kind == "done" and event.stats is not None:
            self.count(event.stats)

    def count(self, stats: Stats) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_prompt_tokens.inc(stats.cached_prompt_tokens)
        self.generated_tokens.inc(stats.completion_tokens)
        self.thinking_tokens.inc(stats.thinking_tokens)
        if stats.completion_tokens:
            self.first_token.observe(stats.timings.get("prompt_eval_s", 0.0))
        if stats.timings.get("tokens_per_s"):
            self.tokens_per_s.observe(stats.timings["tokens_per_s"])


class CountRequests:
    """ASGI middleware: counts each HTTP request by its route and the status of its response."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app fails before it answers

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(endpoint_of(scope), str(status)).inc()


def endpoint_of(scope: Scope) -> str:
    """The path template of the route that handled the request (FastAPI notes it in the scope), or "unmatched"."""
    return getattr(scope.get("route"), "path", "unmatched")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ServerState.of(request).authorize(request)
    return Response(generate_latest(Metrics.of(request).registry), media_type=CONTENT_TYPE_LATEST)
