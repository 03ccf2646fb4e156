"""vsampler's Pallas kernels, installed as `vsampler.kernels` (never as a top-level `kernels`).

Each kernel sits beside its block-size policy, and is verified against `vsampler.core.reference`.
"""
