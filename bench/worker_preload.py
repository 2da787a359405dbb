"""What the fork server of the local executor's workers imports before it forks any.

Every worker then starts with torch, the pipeline and the plugins already imported (a few
seconds each otherwise). ``torch._dynamo`` is here because the first optimiser a process
creates imports it (about a second). Errors are left to each worker's own set-up, which
reports them (:func:`bench.workers._setup`); plugin warnings, likewise, are the
parent's to print.
"""

import contextlib
import warnings

with contextlib.suppress(Exception):
    import torch
    import torch._dynamo  # noqa: F401

    import bench.pipeline  # noqa: F401
    from bench.registry import load_plugins

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_plugins()
