"""vsampler: a fast, verified LLM token sampler for JAX.

The public API: `SamplingParams`, `sample`, `process_logits`, `sample_step` (usable inside any jitted
step), and the EasyDeL `vinference` names `SampleState`, `vInferenceConfig`, `vInferencePreCompileConfig`,
`PartitionAxis`, `create_sampling_step`, `vInference`. `vsampler.testing.tiny_decoder` holds the tiny NNX decoder.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _kernels_from_source_checkout() -> None:
    """Installed, `kernels/` is `vsampler.kernels`; run from a source checkout (PYTHONPATH=. on a machine
    that can install nothing) it sits beside this package: register it under the same name."""
    if _importlib_util.find_spec(__name__ + ".kernels") is not None:
        return
    path = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(path, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location(__name__ + ".kernels", init, submodule_search_locations=[path])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_kernels_from_source_checkout()

import vsampler.core.reference  # noqa: E402  (registers the reference implementation)
import vsampler.impls  # noqa: E402,F401  (registers xla, the kernel variants and vocabulary-parallel sampling)
from vsampler.core.inputs import pack_allowed, unpack_allowed  # noqa: E402
from vsampler.core.logprobs import LogProbs  # noqa: E402
from vsampler.core.params import SamplingParams, Stages  # noqa: E402
from vsampler.core.sampling import available_impls, process_logits, resolve_impl, sample, sample_step  # noqa: E402
from vsampler.core.speculative import verify_draft  # noqa: E402
from vsampler.engine.config import PartitionAxis, vInferenceConfig, vInferencePreCompileConfig  # noqa: E402
from vsampler.engine.inference import vInference  # noqa: E402
from vsampler.engine.state import SampleState  # noqa: E402
from vsampler.engine.step import create_sampling_step  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LogProbs",
    "PartitionAxis",
    "SampleState",
    "SamplingParams",
    "Stages",
    "__version__",
    "available_impls",
    "create_sampling_step",
    "pack_allowed",
    "process_logits",
    "resolve_impl",
    "sample",
    "sample_step",
    "unpack_allowed",
    "vInference",
    "vInferenceConfig",
    "vInferencePreCompileConfig",
    "verify_draft",
]
