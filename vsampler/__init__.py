"""vsampler: a fast, verified LLM token sampler for JAX.

The public API: `SamplingParams`, `sample`, `process_logits` (usable inside any jitted step), and the
EasyDeL `vinference` names `SampleState`, `vInferenceConfig`, `vInferencePreCompileConfig`,
`PartitionAxis`.
"""

from vsampler.config import PartitionAxis, vInferenceConfig, vInferencePreCompileConfig
from vsampler.params import SamplingParams, Stages
from vsampler.sampling import available_impls, process_logits, resolve_impl, sample
from vsampler.state import SampleState

__version__ = "0.1.0"

__all__ = [
    "PartitionAxis",
    "SampleState",
    "SamplingParams",
    "Stages",
    "__version__",
    "available_impls",
    "process_logits",
    "resolve_impl",
    "sample",
    "vInferenceConfig",
    "vInferencePreCompileConfig",
]
