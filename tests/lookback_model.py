"""A known-output model that looks back: it calls a tool, then answers by copying a word from the tool's response.

The chain models of localqwen/synthetic.py replay one script because their next token depends only on the current
one. An agent loop (generate, run the tool calls, append the results as tool messages, generate again) needs a model
whose output after a tool result depends on that result. This one, greedy, says exactly:

- when no `</tool_response>` token is anywhere in the prompt (a fresh question; tools in the system prompt are fine):
  CALL_THINKING, `</think>`, "\\n\\n", `<tool_call>` TOOL_CALL `</tool_call>`, `<|im_end|>` (TOOL_CALL is compact JSON
  without the real model's newlines and spaces: a token may not repeat within a script);
- when the prompt holds at least one `</tool_response>` (the template renders a tool message as
  `<|im_start|>user\\n<tool_response>\\n{content}\\n</tool_response><|im_end|>`): ANSWER_THINKING, `</think>`, "\\n\\n",
  ANSWER with {} filled by the word of VALUES that occurs nearest the end of the prompt, or by UNKNOWN when none
  occurs, then `<|im_end|>`. A value occurs where its token does, bare or after a space: `hot`, `"hot"` in JSON and
  ` hot` count, so does `hotter` (tokenized hot + ter); `Hot` does not. So with two rounds of tool calls it answers
  from the last response, and a response naming two values ("hot in the morning, cold at night") gives the later
  one. Values are ordered by their distance from the end of the prompt (see the copy head below), within
  RECENCY_SPAN tokens; even adjacent ones ("clear cool") were ordered right in every case tried. A value the user
  mentions counts too: the model does not check where in the prompt a value stands. Once a tool response is in the
  prompt the model always answers and never calls again; an agent loop's later calls are the app's to make.

How (one layer, two attention heads, an MLP of AND gates; hidden width 128, MLP width 64, the real vocabulary).
Only what happens at the last prompt position and after it matters: earlier positions compute unused outputs.

Residual stream. Every token the model knows embeds as two ones: a BIAS dimension shared by all (it gives every
position the same attention query) and an identity slot of its own. The value words share one slot per value (bare
and spaced forms alike). Tokens the model does not know embed as zeros and are inert. Attention adds two things: a
FLAG dimension (about 1 when the prompt holds `</tool_response>`, exactly 0 otherwise) and one COPY dimension per
value (about 1 for the value nearest the end). The MLP then writes into one NEXT slot per token the model can say;
the untied lm_head reads NEXT slot u as token u's logit (times LINK); tokens the model never says get logit 0.

Attention. Qwen3 RMS-normalizes q and k per head before RoPE, so only their directions count (q_norm and k_norm
scale all dimensions by QK_SCALE); a zero vector stays zero and scores 0. Queries come from BIAS, so they are the
same at every position; keys are zero except at the tokens looked for.
- Branch head: query and key (on `</tool_response>` only) lie in the head's last rotary pair, which RoPE turns by
  5e-7 radians per position (theta^(-30/32)), so not at all in practice: every `</tool_response>` scores
  QK_SCALE^2 * sqrt(head_dim) (about 9,000), every other token 0, so attention lands on the markers whatever their
  position. Only markers have a value (1 on FLAG); with no marker the head averages zeros.
- Copy head: value-word keys share one direction, half in the last pair (content: "a value word") and half in the
  recency pair (recency_pair()), whose frequency w turns it by about 1.2 radians over RECENCY_SPAN tokens. The
  query's part in that pair leads by a phase p = pi/2 - 1.2/2, so a value word at distance n scores
  C * (1 + cos(w * n + p)) with C = QK_SCALE^2 * sqrt(head_dim) / 2 (about 4,500): at least 1,900, far above the 0
  of other tokens, and 4 to 5 lower per token of distance, so the value nearest the end takes the attention. A
  value word's value vector is 1 on its own COPY dimension.

MLP (SwiGLU: silu(gate) * up, an AND of two signals). Neuron "after t in branch X, say u" has gate = t's identity
slot (silu(0) = 0 elsewhere, so it fires only on t) and up = FLAG for the answer script, BIAS - FLAG for the call
script; down writes its NEXT slot u. Both scripts may share tokens (`\\n`, `</think>`, "\\n\\n", `<|im_end|>`): the
branch decides. After the token before the value (" is"), neurons with up = COPY_j say value j, and one with
up = FLAG - sum(COPY) says UNKNOWN when no value was found; after any value, " in" (the rest of ANSWER) follows.
Within a script no token may repeat (script_chain checks it), nor may the token before the value occur in the call
script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import count, pairwise
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from localqwen.constants import ENDOFTEXT_ID
from localqwen.synthetic import (
    ADDED_TOKENS,
    QwenShape,
    script_chain,
    tensor_shapes,
    tokenizer_json,
    write_checkpoint,
)

CALL_THINKING = "The user asks about Paris weather, so I must call a tool."
TOOL_CALL = '{"name":"get_weather","arguments":{"city": "Paris"}}'  # compact: a token may not repeat
ANSWER_THINKING = "Got the tool result, so I can reply now"
ANSWER = "It is {} in Paris."  # {} is a word of VALUES, or UNKNOWN
VALUES = ("hot", "cold", "cool", "clear", "grey")  # each one token bare and with a leading space
UNKNOWN = "unknown"

TOOL_RESPONSE_CLOSE_ID = ENDOFTEXT_ID + ADDED_TOKENS.index("</tool_response>")  # 151666
HEAD_DIM = 32
BRANCH_HEAD, COPY_HEAD = 0, 1  # each reads its own KV head
QK_SCALE = 40.0  # q_norm and k_norm weights: how sharp attention is
RECENCY_SPAN = 1024  # the copy head orders values by distance within this many tokens
LINK = 8.0  # lm_head weight from a NEXT slot to its token
BIAS = 0  # residual dimension that is 1 at every known token


def round_up(n: int, multiple: int = 32) -> int:
    return -(-n // multiple) * multiple


@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json())


def _one_token(text: str) -> int:
    ids = _tokenizer().encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"{text!r} must be a single token, it is {len(ids)}")
    return ids[0]


def call_chain() -> list[int]:
    """The tokens of round one: the prompt's last token ("\\n") and then everything the model says."""
    return script_chain(CALL_THINKING, "", tool_call=TOOL_CALL)[0]


def answer_chain(value: str = VALUES[0]) -> list[int]:
    """The tokens of an answer naming `value` (a word of VALUES, or UNKNOWN), from the prompt's last "\\n" on."""
    return script_chain(ANSWER_THINKING, ANSWER.format(value))[0]


@dataclass
class Circuit:
    """Where each signal lives in the residual stream, and the MLP's neurons."""

    call: list[int]  # round one's chain
    answer: list[int]  # the answer chain with VALUES[0]; answer[value_at] is where the copied value goes
    value_at: int
    values: list[tuple[int, int]]  # (bare, spaced) token ids of each value
    unknown: int
    slot: dict[int, int] = field(default_factory=dict)  # token id -> identity dimension
    next_slot: dict[int, int] = field(default_factory=dict)  # token id -> dimension read as its logit
    neurons: list[tuple[int, dict[int, float], int]] = field(default_factory=list)  # (gate dim, up dims, token)

    def __post_init__(self) -> None:
        dims = count(BIAS + 1)
        scripted = [*self.call, *self.answer[:self.value_at], *self.answer[self.value_at + 1:]]
        for token in [*scripted, TOOL_RESPONSE_CLOSE_ID, self.unknown]:
            self.slot.setdefault(token, next(dims))
        for bare, spaced in self.values:
            self.slot[bare] = self.slot[spaced] = next(dims)
        self.flag = next(dims)
        self.copies = [next(dims) for _ in self.values]
        said = [*self.call[1:], *self.answer[1:], *(spaced for _, spaced in self.values), self.unknown]
        for token in said:
            if token not in self.next_slot:
                self.next_slot[token] = next(dims)
        self.width = next(dims)

        for t, u in pairwise(self.call):
            self.neurons.append((self.slot[t], {BIAS: 1.0, self.flag: -1.0}, u))
        before, after = self.answer[self.value_at - 1], self.answer[self.value_at + 1]
        for i, (t, u) in enumerate(pairwise(self.answer)):
            if i not in (self.value_at - 1, self.value_at):  # the steps into and out of the value: below
                self.neurons.append((self.slot[t], {self.flag: 1.0}, u))
        for copy, (_, spaced) in zip(self.copies, self.values, strict=True):
            self.neurons.append((self.slot[before], {copy: 1.0}, spaced))
            self.neurons.append((self.slot[spaced], {self.flag: 1.0}, after))
        self.neurons.append((self.slot[before], {self.flag: 1.0, **dict.fromkeys(self.copies, -1.0)}, self.unknown))
        self.neurons.append((self.slot[self.unknown], {self.flag: 1.0}, after))


def build_circuit() -> Circuit:
    """Tokenize the scripts and check the constraints the construction relies on (ValueError if broken)."""
    answer = answer_chain()
    values = [(_one_token(v), _one_token(" " + v)) for v in VALUES]
    unknown = _one_token(" " + UNKNOWN)
    value_at = answer.index(values[0][1])
    call = call_chain()
    if answer[value_at - 1] in call:
        raise ValueError("the token before the answer's value must not occur in the call script")
    words = [*(t for pair in values for t in pair), unknown]
    if len(set(words)) != len(words) or set(words) & set(call + answer[:value_at] + answer[value_at + 1:]):
        raise ValueError("the value words and UNKNOWN must be distinct tokens that the scripts do not use")
    return Circuit(call, answer, value_at, values, unknown)


def lookback_shape(circuit: Circuit) -> QwenShape:
    """One layer, the two heads (each its own KV head), widths rounded up to multiples of 32; lm_head untied."""
    return QwenShape(hidden_size=round_up(circuit.width), intermediate_size=round_up(len(circuit.neurons)),
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=HEAD_DIM,
                     tie_word_embeddings=False)


def recency_pair(shape: QwenShape) -> tuple[int, float]:
    """The rotary pair that turns the most while staying under 1.5 radians over RECENCY_SPAN, and its frequency."""
    half = shape.head_dim // 2
    frequencies = [shape.rope_theta ** (-2 * i / shape.head_dim) for i in range(half)]
    pair = next(i for i, w in enumerate(frequencies) if w * RECENCY_SPAN <= 1.5)
    return pair, frequencies[pair]


def lookback_weights(circuit: Circuit, shape: QwenShape) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (nothing random), as the module docstring describes."""
    w = {name: np.zeros(dims, np.float32) for name, dims in tensor_shapes(shape).items()}
    for name in w:
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")):
            w[name][:] = 1.0
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            w[name][:] = QK_SCALE
    embed = w["model.embed_tokens.weight"]
    for token, dim in circuit.slot.items():
        embed[token, [BIAS, dim]] = 1.0

    d, half = shape.head_dim, shape.head_dim // 2
    content = half - 1  # the last rotary pair: it barely turns
    pair, frequency = recency_pair(shape)
    phase = math.pi / 2 - frequency * RECENCY_SPAN / 2  # centres the span on the steepest part of the cosine
    p = "model.layers.0."
    q, k, v, o = (w[p + f"self_attn.{x}_proj.weight"] for x in "qkvo")
    v_unit = math.sqrt(2 / shape.hidden_size)  # input_layernorm turns a token's two ones into sqrt(hidden / 2)
    branch, copy = BRANCH_HEAD * d, COPY_HEAD * d
    q[branch + content, BIAS] = 1.0
    k[branch + content, circuit.slot[TOOL_RESPONSE_CLOSE_ID]] = 1.0
    v[branch, circuit.slot[TOOL_RESPONSE_CLOSE_ID]] = v_unit
    o[circuit.flag, branch] = 1.0
    q[[copy + content, copy + pair, copy + pair + half], BIAS] = [1.0, math.cos(phase), math.sin(phase)]
    for j, (bare, _) in enumerate(circuit.values):
        k[[copy + content, copy + pair], circuit.slot[bare]] = 1.0
        v[copy + j, circuit.slot[bare]] = v_unit
        o[circuit.copies[j], copy + j] = 1.0

    gate, up, down = (w[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
    for n, (gate_dim, up_dims, token) in enumerate(circuit.neurons):
        gate[n, gate_dim] = 1.0
        up[n, list(up_dims)] = list(up_dims.values())
        down[circuit.next_slot[token], n] = 1.0
    head = w["lm_head.weight"]
    for token, dim in circuit.next_slot.items():
        head[token, dim] = LINK
    return w


def write_lookback_checkpoint(dest: Path, **kwargs) -> Path:
    """write_checkpoint() of the lookback model at `dest` (float16, one shard unless kwargs say otherwise)."""
    circuit = build_circuit()
    shape = lookback_shape(circuit)
    kwargs = {"dtype": "float16", "shards": 1, **kwargs}
    return write_checkpoint(dest, shape, weights=lookback_weights(circuit, shape), **kwargs)
