"""Facts about Qwen3-4B-Thinking-2507 that the whole package relies on: one source of truth.

Token ids, the markers of the chat template and how it lays them out, sampling defaults, and the architecture's
hyperparameters with the tensor shapes they imply (read from config.json by the converter and from GGUF metadata
by the model check). Nothing here imports the converter, llama.cpp or any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_REPO = "Qwen/Qwen3-4B-Thinking-2507"
MODEL_NAME = "Qwen3-4B-Thinking-2507"
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
GGUF_ARCH = "qwen3"
NATIVE_CONTEXT = 262_144
DEFAULT_QUANT = "q4_k_m"  # what `pull` and `convert` make unless told otherwise: ~2.5 GB for the 4B

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

# How the chat template lays out an assistant turn: `<think>\n{thinking}\n</think>\n\n{answer}`, each tool call as
# `<tool_call>\n{json}\n</tool_call>`. The parser trims this layout; these rebuild it where raw text is wanted.
THINKING_OPENER = THINK_OPEN + "\n"
THINKING_CLOSER = "\n" + THINK_CLOSE + "\n\n"


def tool_call_block(body: str) -> str:
    """A tool call's JSON as the template writes it between its markers."""
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


# The model card's recommended sampling. llama.cpp's own min_p default is 0.05, so it is set explicitly.
DEFAULT_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
DEFAULT_MAX_TOKENS = 32_768

# The Qwen3 technical report's way to end thinking when the budget runs out.
THINKING_BUDGET_WRAP_UP = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
)
# The wrap-up in the template's layout (the report writes "</think>.\n\n"; the chat template renders "</think>\n\n"):
# the message engines such as llama-server put before `</think>`, and the whole text put in the model's mouth.
THINKING_WRAP_UP_MESSAGE = "\n\n" + THINKING_BUDGET_WRAP_UP
THINKING_WRAP_UP_TEXT = THINKING_WRAP_UP_MESSAGE + THINK_CLOSE + "\n\n"
# The context `--ctx auto` grows to at most: the card's 32,768-token output budget plus room for the prompt.
# Longer contexts (up to NATIVE_CONTEXT) are there for the asking, best with a quantized KV cache.
DEFAULT_CONTEXT = 40_960


@dataclass(frozen=True)
class Hparams:
    """The hyperparameters of a Qwen3 model, as config.json names them (the GGUF check reads them from metadata)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool


def expected_shapes(hp: Hparams) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3ForCausalLM checkpoint must hold, with the shape config.json implies."""
    q_dim, kv_dim = hp.num_attention_heads * hp.head_dim, hp.num_key_value_heads * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp.vocab_size, hp.hidden_size),
        "model.norm.weight": (hp.hidden_size,),
    }
    if not hp.tie_word_embeddings:
        shapes["lm_head.weight"] = (hp.vocab_size, hp.hidden_size)
    for i in range(hp.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hp.hidden_size,),
            f"{layer}.self_attn.q_proj.weight": (q_dim, hp.hidden_size),
            f"{layer}.self_attn.k_proj.weight": (kv_dim, hp.hidden_size),
            f"{layer}.self_attn.v_proj.weight": (kv_dim, hp.hidden_size),
            f"{layer}.self_attn.o_proj.weight": (hp.hidden_size, q_dim),
            f"{layer}.self_attn.q_norm.weight": (hp.head_dim,),
            f"{layer}.self_attn.k_norm.weight": (hp.head_dim,),
            f"{layer}.post_attention_layernorm.weight": (hp.hidden_size,),
            f"{layer}.mlp.gate_proj.weight": (hp.intermediate_size, hp.hidden_size),
            f"{layer}.mlp.up_proj.weight": (hp.intermediate_size, hp.hidden_size),
            f"{layer}.mlp.down_proj.weight": (hp.hidden_size, hp.intermediate_size),
        }
    return shapes
