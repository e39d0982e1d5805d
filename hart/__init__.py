"""HART: hybrid autoregressive transformer for text-to-image generation."""
from .pipeline import GenerationResult, HARTPipeline
from .sampler import SamplingOptions

__all__ = ["HARTPipeline", "GenerationResult", "SamplingOptions"]
