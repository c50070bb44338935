"""Analysis tools: parameter and FLOP accounting (more tools live beside it)."""
from .complexity import FlopCount, MetaFlopCounter, count_flops, count_params

__all__ = ["FlopCount", "MetaFlopCounter", "count_flops", "count_params"]
