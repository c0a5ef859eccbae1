"""misa: Module-wise Importance SAmpling for memory-efficient LLM training (arXiv 2511.00056)."""

from .baselines import LISA, BAdam
from .optimizer import MISA, BlockCoordinateDescentOptimizer
from .partition import Module, Partition, partition
from .sampler import ImportanceSampler
from .variants import PRESETS, Variant

__all__ = [
    "MISA",
    "LISA",
    "BAdam",
    "BlockCoordinateDescentOptimizer",
    "ImportanceSampler",
    "Module",
    "Partition",
    "partition",
    "Variant",
    "PRESETS",
]
