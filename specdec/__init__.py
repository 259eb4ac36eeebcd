"""specdec: lossless speculative decoding for Llama-style models."""

from specdec.generate import GenerationResult, SamplingParams, generate, stream
from specdec.loading import Model, load_model

__all__ = ["GenerationResult", "Model", "SamplingParams", "generate", "load_model", "stream"]
