"""Every dialect localqwen speaks, through `serve --upstream`: the Anthropic, Responses and Ollama test suites run
again, each server they talk to now a localqwen whose model is a RemoteModel in front of the server they test
directly (real uvicorn, real clients, real HTTP twice over). The expected values still come from the local models."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from localqwen.remote import RemoteModel
from localqwen.server import create_app
from tests import test_dialect_anthropic, test_dialect_ollama, test_dialect_responses
from tests.dialect_servers import MODEL_ID, dialect_servers
from tests.test_server import KEY, running

# Ollama's model listing describes the GGUF file (size, quantization, parameters): an upstream engine has no file.
FILE_BOUND = {"test_model_listing"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    with dialect_servers(tmp_path_factory.mktemp("upstream")) as direct:
        main, lookback = RemoteModel.connect(direct.main, api_key=KEY), RemoteModel.connect(direct.lookback)
        try:
            with running(create_app(main, api_key=KEY, model_id=MODEL_ID)) as main_url, \
                    running(create_app(lookback)) as lookback_url:
                # The upstream localqwen judges answer schemas itself, naming the field it got them in.
                yield SimpleNamespace(**{**vars(direct), "main": main_url, "lookback": lookback_url,
                                         "schema_field": "response_format.json_schema.schema"})
        finally:
            main.close()
            lookback.close()


# The suites' own test functions, collected here again under this module's `env`.
for _suite in (test_dialect_anthropic, test_dialect_responses, test_dialect_ollama):
    for _name, _test in vars(_suite).items():
        if _name.startswith("test_") and _name not in FILE_BOUND:
            globals()[f"{_name}__{_suite.__name__.rsplit('_', 1)[1]}"] = _test


def test_ollama_lists_the_upstream_engines_model(env: SimpleNamespace) -> None:
    """What Ollama's clients ask first (/api/tags, /api/show, /api/ps): the model by name, family and context, with
    no file behind it to measure."""
    api = test_dialect_ollama.client(env.main)
    [model] = api.list().models
    assert (model.model, model.size, model.details.family, len(model.digest)) == (MODEL_ID, 0, "qwen3", 64)
    shown = api.show(MODEL_ID)
    assert shown.modelinfo == {"general.architecture": "qwen3", "qwen3.context_length": 512}
    assert {"thinking", "tools"} <= set(shown.capabilities) and "num_ctx" in shown.parameters
    [running] = api.ps().models
    assert (running.model, running.context_length, running.size) == (MODEL_ID, 512, 0)
