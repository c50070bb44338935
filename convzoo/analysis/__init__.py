"""Analysis tools: parameter and FLOP accounting (more tools live beside it)."""
from .complexity import FlopCount, count_flops, count_params

__all__ = ["FlopCount", "count_flops", "count_params"]
