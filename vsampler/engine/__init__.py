"""The decode loop around the sampler: configuration, state, the sampling step, host-side inputs, the
executable cache and loop (`vInference`), partitioning and the quantized KV caches."""
