"""The tools around the sampler: verification against the reference, workloads, benchmarks, the
deviceless compile check and static TPU estimate, plots, and the `vsampler` CLI."""
