"""The servers every dialect test talks to: real uvicorn on loopback over known-output models.

- `main`: the scripted chain model of tests/test_server.py (THINKING, then ANSWER), behind an API key.
- `lookback`: the lookback model (tests/lookback_model.py): it calls get_weather, then answers with the value the
  tool's result names, so a tool round trip proves the result reached the prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from localqwen.constants import THINK_CLOSE_ID, THINKING_BUDGET_WRAP_UP
from localqwen.convert import convert
from localqwen.model import Model
from localqwen.server import create_app
from localqwen.synthetic import script_chain
from tests.lookback_model import write_lookback_checkpoint
from tests.test_server import ANSWER, KEY, THINKING, load_chain, running

MODEL_ID = "qwen-test"
WRAP_UP = THINKING_BUDGET_WRAP_UP.strip()
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@contextlib.contextmanager
def dialect_servers(tmp: Path) -> Iterator[SimpleNamespace]:
    chain = script_chain(THINKING, ANSWER)[0]
    scripted = load_chain(tmp, "scripted", chain)
    [path] = convert(str(write_lookback_checkpoint(tmp / "lookback")), ["f16"], outdir=tmp, quiet=True)
    lookback = Model.load(path, n_ctx=1024, gpu_layers=0, threads=1)
    try:
        with running(create_app(scripted, api_key=KEY, model_id=MODEL_ID)) as main, \
                running(create_app(lookback)) as lookback_url:
            yield SimpleNamespace(main=main, lookback=lookback_url, scripted=scripted, lookback_model=lookback,
                                  chain=chain)
    finally:
        scripted.close()
        lookback.close()


def completion_tokens(env: SimpleNamespace) -> int:
    """Tokens the scripted model generates: its chain less the prompt's last token and <|im_end|>."""
    return len(env.chain) - 2


def thinking_tokens(env: SimpleNamespace) -> int:
    return env.chain.index(THINK_CLOSE_ID)


def first_thinking(env: SimpleNamespace, n: int) -> str:
    """The scripted model's first `n` thinking tokens as text."""
    return env.scripted.detokenize(env.chain[1:n + 1])
