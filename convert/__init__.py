"""HF safetensors -> GGUF: read and validate (checkpoint, vocab), write (gguf_file), quantize, and the pipeline."""

from .pipeline import OUTPUT_TYPES, convert

__all__ = ["OUTPUT_TYPES", "convert"]
