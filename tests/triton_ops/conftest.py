"""The Triton kernels' tests. CI runs them on CPU tensors under the Triton interpreter, in their
own pytest invocation (the interpreter must be switched on before triton decorates our kernels):

    TRITON_INTERPRET=1 python -m pytest tests/triton_ops

On a machine with a GPU they run unchanged on CUDA tensors (`python -m pytest tests/triton_ops`).
Anywhere else every test here is skipped with the reason (the main invocation of the suite,
where triton was imported without the interpreter, on a machine without a GPU).
"""

from __future__ import annotations

import pytest
from triton_device import DEVICE, WHY


def pytest_collection_modifyitems(config, items):
    if DEVICE is not None:
        return
    skip = pytest.mark.skip(reason=WHY)
    for item in items:
        if "triton_ops" in str(item.fspath):
            item.add_marker(skip)
