"""Facts about Qwen3-4B-Thinking-2507 that the whole package relies on: one source of truth."""

from __future__ import annotations

DEFAULT_REPO = "Qwen/Qwen3-4B-Thinking-2507"
MODEL_NAME = "Qwen3-4B-Thinking-2507"
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
GGUF_ARCH = "qwen3"
NATIVE_CONTEXT = 262_144

# Special token ids of the Qwen3 vocabulary (tokenizer.json, added_tokens).
ENDOFTEXT_ID = 151643  # also the padding token
IM_START_ID = 151644
IM_END_ID = 151645  # end of a turn: the model's EOS
TOOL_CALL_OPEN_ID = 151657
TOOL_CALL_CLOSE_ID = 151658
THINK_OPEN_ID = 151667
THINK_CLOSE_ID = 151668

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# The model card's recommended sampling. llama.cpp's own min_p default is 0.05, so it is set explicitly.
DEFAULT_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
DEFAULT_MAX_TOKENS = 32_768

# The Qwen3 technical report's way to end thinking when the budget runs out.
THINKING_BUDGET_WRAP_UP = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
)
# The context `--ctx auto` grows to at most: the card's 32,768-token output budget plus room for the prompt.
# Longer contexts (up to NATIVE_CONTEXT) are there for the asking, best with a quantized KV cache.
DEFAULT_CONTEXT = 40_960
