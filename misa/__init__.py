"""misa: Module-wise Importance SAmpling for memory-efficient LLM training (arXiv 2511.00056)."""

from .optimizer import MISA, BlockCoordinateDescentOptimizer
from .partition import Module, Partition, partition
from .sampler import ImportanceSampler

__all__ = ["MISA", "BlockCoordinateDescentOptimizer", "ImportanceSampler", "Module", "Partition", "partition"]
