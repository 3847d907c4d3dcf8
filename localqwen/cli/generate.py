"""Commands that generate: `run` (one prompt), `chat` (the terminal chat) and `serve` (the HTTP API)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from localqwen.cli.edge import Command
from localqwen.cli.options import PARALLEL_OPTION, UPSTREAM, generation_options, with_model


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one in (PROMPT '-' reads stdin)")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    return prompt


def read_schema(ctx: click.Context, param: click.Parameter, path: str | None) -> dict[str, Any] | None:
    """--schema FILE: a JSON Schema the grammar can enforce, read and checked before the model loads; a file that
    cannot be read, is not JSON or uses what the grammar cannot enforce is one line (`Error: FILE: ...`)."""
    if path is None:
        return None
    from localqwen.constrain import json_answer
    from localqwen.errors import BadRequest

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read it ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: not JSON ({exc})") from None
    try:
        json_answer(schema)
    except BadRequest as exc:
        raise click.ClickException(f"{path}: {exc.message}") from None
    return schema


@click.command("run", cls=Command)
@click.argument("prompt", required=False)
@with_model
@generation_options
@click.option("--show-thinking", is_flag=True, help="Stream the thinking to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with thinking, content and stats.")
@click.option("--schema", metavar="FILE.json", callback=read_schema,
              help="Answer with JSON that matches this JSON Schema (the thinking stays free); --json adds it as "
                   '"parsed". Exit status 1 if the token limit cut the answer short.')
def run_command(model: Any, prompt: str | None, system: str | None, show_thinking: bool, as_json: bool,
                schema: dict[str, Any] | None, **options: Any) -> None:
    """Answer one PROMPT (or stdin) and exit: the answer on stdout, thinking on stderr if asked."""
    from localqwen.events import Reply

    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": read_prompt(prompt)}]
    events = model.chat(messages, schema=schema, **options)
    if as_json:
        try:
            reply = Reply.collect(events)
        except ValueError as exc:  # an engine behind --url that answered outside the schema
            if schema is None:
                raise
            raise click.ClickException(f"the answer does not match the schema: {str(exc).splitlines()[0]}") from None
        data = reply.to_dict()
        if schema is not None:
            data["parsed"] = reply.parsed
        click.echo(json.dumps(data, ensure_ascii=False))
        if schema is not None and reply.stats.finish_reason == "length":
            raise SystemExit(1)
        return
    for event in events:
        if event.kind == "thinking" and show_thinking:
            click.secho(event.text, err=True, dim=True, nl=False)
        elif event.kind == "content":
            click.echo(event.text, nl=False)
        elif event.kind == "tool_call":
            click.echo(json.dumps({"tool_call": event.tool_call.raw}, ensure_ascii=False))
        elif event.kind == "done":
            click.echo()
            if event.stats.finish_reason == "length":
                where = " while thinking" if event.stats.truncated_thinking else ""
                click.secho(f"[stopped at the token limit{where}]", err=True, dim=True)
                if schema is not None:
                    raise SystemExit(1)  # the answer is not the complete JSON a script expects


@click.command("chat", cls=Command)
@with_model
@generation_options
@click.option("--hide-thinking", is_flag=True, help="Show only a one-line summary of the thinking.")
@click.option("--verbose", is_flag=True, help="Print timing stats after each reply.")
@click.option("--mcp", "mcp_config", metavar="CONFIG.json",
              help='Give the model the tools of the MCP servers in this {"mcpServers": ...} file.')
@click.option("--yes", "approved", metavar="TOOL,...", default="",
              help="Run these tools without asking first (comma-separated; /tools lists them).")
def chat_command(model: Any, system: str | None, max_tokens: int | None, thinking_budget: int | None,
                 hide_thinking: bool, verbose: bool, mcp_config: str | None, approved: str, **sampling: Any) -> None:
    """Chat in the terminal: thinking shown apart, /help for commands, Ctrl+D or /bye to leave."""
    from localqwen.chat import chat_repl
    from localqwen.conversation import Approvals, ChatSettings

    settings = ChatSettings(system=system, hide_thinking=hide_thinking, verbose=verbose, max_tokens=max_tokens,
                            thinking_budget=thinking_budget,
                            sampling={k: v for k, v in sampling.items() if v is not None})
    with mcp_servers(mcp_config) as tools:
        names = {tool.name for tool in tools}
        preapproved = [name.strip() for name in approved.split(",") if name.strip()]
        for name in preapproved:
            if name not in names:
                click.secho(f"localqwen: --yes {name}: no such tool (/tools lists them)", err=True, fg="yellow")
        chat_repl(model, settings, tools=tools, approvals=Approvals(preapproved))


@contextlib.contextmanager
def mcp_servers(config: str | None) -> Iterator[list[Any]]:
    """The tools of the MCP servers in `config` (none without one), the servers stopped afterwards; a server that
    cannot start is one line on stderr, and the rest go on."""
    if config is None:
        yield []
        return
    from localqwen.mcp_tools import McpTools

    click.echo("localqwen: starting the MCP servers...", err=True)
    with McpTools.from_config(config) as servers:
        for problem in servers.problems:
            click.secho(f"localqwen: {problem}", err=True, fg="yellow")
        yield servers.tools


def check_origins(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from localqwen.web.guard import parse_origin

    try:
        return tuple(parse_origin(value) for value in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("serve", cls=Command)
@with_model(remote=UPSTREAM)
@PARALLEL_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="LOCALQWEN_API_KEY", help="Require this bearer key (env LOCALQWEN_API_KEY).")
@click.option("--reasoning-format", type=click.Choice(["deepseek", "none"]), default="deepseek", show_default=True,
              help="deepseek: thinking in reasoning_content; none: <think>...</think> left in content.")
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN", callback=check_origins,
              help="Let pages from ORIGIN (e.g. http://localhost:5173) call the API from a browser; repeatable.")
@click.option("--mcp", "mcp_config", metavar="CONFIG.json",
              help='Offer the chat page the tools of the MCP servers in this {"mcpServers": ...} file.')
@click.option("--open", "open_page", is_flag=True, help="Open the chat page in the browser once the server is up.")
def serve_command(model: Any, host: str, port: int, api_key: str | None, reasoning_format: str,
                  cors_origins: tuple[str, ...], mcp_config: str | None, open_page: bool) -> None:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and the chat page (/), of
    a local model or, with --upstream, of a serving engine's."""
    from localqwen.server import serve

    with mcp_servers(mcp_config) as tools:
        serve(model, host=host, port=port, api_key=api_key, reasoning_format=reasoning_format,
              cors_origins=cors_origins, tools=tools, open_page=open_page)


@click.command("ui", cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.pass_context
def ui_command(ctx: click.Context, host: str, port: int) -> None:
    """Open the chat page in the browser, starting `localqwen serve --open` first unless a localqwen server already
    answers on HOST:PORT (other options go to serve: -m, --ctx, --api-key, ...)."""
    import webbrowser

    from localqwen.server.app import page_url, running_at

    page = page_url(host, port)
    if running_at(page):
        click.echo(f"localqwen: the chat page is at {page}")
        webbrowser.open(page)
        return
    serve_command.main(["--host", host, "--port", str(port), "--open", *ctx.args], prog_name="localqwen serve",
                       standalone_mode=False)


COMMANDS = (run_command, chat_command, serve_command, ui_command)
