"""The fast implementations of the spec in `vsampler.core.reference`: the sort-free XLA path, the
launch of the fused Pallas kernels (`vsampler.kernels`) and vocabulary-parallel sampling. Each module
registers itself in `vsampler.core.registry` when imported."""

from vsampler.impls import pallas, vocab_parallel, xla  # noqa: F401  (each registers itself)
