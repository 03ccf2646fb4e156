"""The sampler itself: parameters, input checks, penalties, the reference spec, shared numerics,
log-probs, the implementation registry and the public entries (`sample`, `process_logits`,
`sample_step`, `verify_draft`). Imports nothing above it."""
