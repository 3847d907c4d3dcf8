"""The remote backend: localqwen's generation interface over an OpenAI-compatible endpoint.

    model = RemoteModel.connect("http://gpu-box:8000", api_key="...")   # vLLM, llama-server, localqwen serve, ...
    for event in model.chat([{"role": "user", "content": "Hi"}]):
        print(event.kind, event.text)

`RemoteModel` has the events, the `chat`/`generate` signatures, `tokenize_chat`, `n_ctx` and `sampling` of
`localqwen.model.Model`, so the terminal chat, `run`, the Python API and `serve --upstream` work through it. What
the engines do differently is normalised here:

- Thinking arrives as `reasoning_content` (llama.cpp, localqwen), `reasoning` (vLLM), or left in `content` up to
  `</think>` (an engine without a reasoning parser, or localqwen's `--reasoning-format none`). Which one a stream
  uses is decided by what it sends first: a reasoning field, or content holding `</think>`. Until then content is
  held back, so a reply without thinking is only shown when its stream ends.
- Tool calls arrive as `tool_calls` deltas (assembled and parsed when the stream ends) or as `<tool_call>` text in
  the content (parsed as localqwen's own runtime does).
- Stop strings end the answer, never the thinking, as with a local model: localqwen's server applies them itself;
  for other engines (which match them in the thinking too) they are matched here and the stream is closed.
- Thinking budget: localqwen takes `thinking_budget`; llama-server takes `reasoning_budget_tokens` with the Qwen3
  report's wrap-up as its message; an engine without a per-request budget (vLLM) refuses the request rather than
  return a reply with no answer. With `max_tokens` alone, llama-server also gets localqwen's answer reserve.
- `schema` and `tool_choice` go to the engine as OpenAI's `response_format` (json_schema) and `tool_choice`: the
  engine enforces them; the stream keeps the schema, so Reply.collect validates the answer as for a local model.
  After a wrap-up done here (a client-side budget, answer now) the continuation keeps `response_format`.
- Token counts come from the engine's `usage`; thinking tokens from its `reasoning_tokens` where it counts them
  (localqwen), else one per streamed thinking delta (llama-server and vLLM send one delta per token).

Every failure to reach or use the endpoint is a one-line `RemoteError` naming it (its `status` is the HTTP status).

    backend.py   RemoteModel: the endpoint, its requests, tokens
    chunks.py    ChunkReader: an engine's streamed chunks -> localqwen events (pure)
    streams.py   RemoteStream: one reply's HTTP stream, read with `for` or `async for`; cancel, close, answer now
    wire.py      JSON requests and the one-line errors
"""

from localqwen.remote.backend import Endpoint, RemoteModel
from localqwen.remote.chunks import ChunkReader
from localqwen.remote.streams import RemoteStream

__all__ = ["ChunkReader", "Endpoint", "RemoteModel", "RemoteStream"]
