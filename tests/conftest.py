import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis

hypothesis.settings.register_profile("vsampler", deadline=None, max_examples=60, print_blob=True)
hypothesis.settings.load_profile("vsampler")
