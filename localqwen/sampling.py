"""Generation options: the one list of them, and the sampler settings they resolve to.

`OPTIONS` is the single source for every per-generation option a user can set: the CLI's flags
(localqwen.cli.options), the terminal chat's `/set` keys (localqwen.conversation) and the server's request
fields (localqwen.server.openai) are all derived from it, and `Sampling` validates against it.

`Sampling` holds the sampler settings one generation uses: the model card's defaults, replaced by the GGUF's own
`general.sampling.*`, replaced by what the caller asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from localqwen.constants import DEFAULT_SAMPLING
from localqwen.errors import BadRequest


@dataclass(frozen=True)
class Option:
    """One generation option: its name (a Python keyword, a JSON field; `--name-with-dashes` on the command line),
    its type, what it does, and the values it accepts."""

    name: str
    kind: type[int] | type[float]
    help: str
    minimum: float
    maximum: float | None = None
    above_minimum: bool = False  # the minimum itself is not allowed (top_p > 0)
    sampler: bool = True  # a setting of the sampler (a Sampling field); else a limit of the generation

    def check(self, value: Any) -> None:
        """Raise BadRequest unless `value` is a usable value of this option."""
        if self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
        if ok:
            ok = value > self.minimum if self.above_minimum else value >= self.minimum
            ok = ok and (self.maximum is None or value <= self.maximum)
        if not ok:
            raise BadRequest(f"{self.name}={value!r} is out of range")

    @property
    def kind_name(self) -> str:
        return "a whole number" if self.kind is int else "a number"

    @property
    def accepted(self) -> str:
        low = f"above {self.minimum:g}" if self.above_minimum else f"of at least {self.minimum:g}"
        return f"{self.kind_name} {low}" + (f" and at most {self.maximum:g}" if self.maximum is not None else "")


OPTIONS = (
    Option("temperature", float, "Randomness of sampling; 0 always takes the most likely token.", 0, 5),
    Option("top_p", float, "Sample from the smallest set of tokens whose probability reaches this.", 0, 1,
           above_minimum=True),
    Option("top_k", int, "Sample from the k most likely tokens (0: all).", 0),
    Option("min_p", float, "Drop tokens less likely than this fraction of the most likely one.", 0, 1),
    Option("presence_penalty", float, "Penalise tokens already generated (against endless repetition).", -2, 2),
    Option("seed", int, "Random seed, for repeatable sampling (default: a fresh one each time).", 0, 2**32 - 1),
    Option("max_tokens", int, "Most tokens to generate (thinking + answer).", 1, sampler=False),
    Option("thinking_budget", int, "Most thinking tokens before the model must answer.", 0, sampler=False),
)
OPTION = {option.name: option for option in OPTIONS}
SAMPLER_OPTIONS = tuple(o.name for o in OPTIONS if o.sampler)
LIMIT_OPTIONS = tuple(o.name for o in OPTIONS if not o.sampler)


@dataclass(frozen=True)
class Sampling:
    temperature: float = DEFAULT_SAMPLING["temperature"]
    top_p: float = DEFAULT_SAMPLING["top_p"]
    top_k: int = int(DEFAULT_SAMPLING["top_k"])
    min_p: float = DEFAULT_SAMPLING["min_p"]
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per generation

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None or field.name != "seed":
                OPTION[field.name].check(value)

    @classmethod
    def from_metadata(cls, defaults: dict[str, float]) -> Sampling:
        """The defaults a GGUF carries (metadata.ModelMetadata.sampling), falling back to the model card's."""
        return cls(**defaults)

    def with_overrides(self, **overrides: Any) -> Sampling:
        """A copy with every override that is not None applied (and validated)."""
        unknown = set(overrides) - set(SAMPLER_OPTIONS)
        if unknown:
            raise BadRequest(f"unknown sampling option {sorted(unknown)[0]}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
