"""HF safetensors -> GGUF: read and validate (checkpoint, vocab), write (gguf_file), quantize, and the pipeline."""

from .pipeline import DEFAULT_QUANT, OUTPUT_TYPES, convert

__all__ = ["DEFAULT_QUANT", "OUTPUT_TYPES", "convert"]
