"""Sampling settings: the model card's defaults, the GGUF's own `general.sampling.*`, and user overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from localqwen.constants import DEFAULT_SAMPLING
from localqwen.errors import LocalqwenError

# GGUF metadata keys written by the converter (from generation_config.json), as llama.cpp names them.
GGUF_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
                      "top_k": "general.sampling.top_k", "min_p": "general.sampling.min_p"}


@dataclass(frozen=True)
class Sampling:
    temperature: float = DEFAULT_SAMPLING["temperature"]
    top_p: float = DEFAULT_SAMPLING["top_p"]
    top_k: int = int(DEFAULT_SAMPLING["top_k"])
    min_p: float = DEFAULT_SAMPLING["min_p"]
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per generation

    def __post_init__(self) -> None:
        checks = {
            "temperature": 0 <= self.temperature <= 5,
            "top_p": 0 < self.top_p <= 1,
            "top_k": isinstance(self.top_k, int) and self.top_k >= 0,
            "min_p": 0 <= self.min_p <= 1,
            "presence_penalty": -2 <= self.presence_penalty <= 2,
            "seed": self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32),
        }
        for name, ok in checks.items():
            if not ok:
                raise LocalqwenError(f"{name}={getattr(self, name)!r} is out of range")

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Sampling:
        """The defaults the GGUF carries, falling back to the model card's."""
        found: dict[str, Any] = {}
        for name, key in GGUF_SAMPLING_KEYS.items():
            if key in metadata:
                found[name] = int(metadata[key]) if name == "top_k" else float(metadata[key])
        return cls(**found)

    def with_overrides(self, **overrides: Any) -> Sampling:
        """A copy with every override that is not None applied (and validated)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise LocalqwenError(f"unknown sampling option {sorted(unknown)[0]}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
