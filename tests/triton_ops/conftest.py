"""The Triton kernels' tests. CI runs them on CPU tensors under the Triton interpreter, in their
own pytest invocation (the interpreter must be switched on before triton decorates our kernels):

    TRITON_INTERPRET=1 python -m pytest tests/triton_ops

On a machine with a GPU they run unchanged on CUDA tensors (`python -m pytest tests/triton_ops`).
Anywhere else every test here is skipped with the reason (the main invocation of the suite,
where triton was imported without the interpreter, on a machine without a GPU).

Many tests reuse the CPU tests of tests/test_<op>.py and tests/test_nonfinite.py with
backend="triton"; those make CPU tensors. On a GPU the fixture below sends every call of
gtp_kernels.ops.<op>(..., backend="triton") to the GPU and brings the results back, so the
same tests check the kernels on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from triton_device import DEVICE, WHY

import gtp_kernels.ops as ops


def pytest_collection_modifyitems(config, items):
    if DEVICE is not None:
        return
    skip = pytest.mark.skip(reason=WHY)
    for item in items:
        if "triton_ops" in str(item.fspath):
            item.add_marker(skip)


def _moved(x, device):
    if isinstance(x, torch.Tensor):
        return x if x.device.type == "meta" else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_moved(v, device) for v in x)
    return x


@pytest.fixture(autouse=True)
def _triton_calls_on_device(monkeypatch):
    if DEVICE in (None, "cpu"):
        yield
        return
    for name in ("attention", "build_graph", "propagate", "select_tokens"):
        real = getattr(ops, name)

        def on_device(*args, backend="auto", _real=real, **kwargs):
            if backend != "triton":
                return _real(*args, backend=backend, **kwargs)
            home = next(a.device for a in args if isinstance(a, torch.Tensor))
            if home.type == "meta":  # meta tensors stay meta (fake-tensor checks)
                return _real(*args, backend=backend, **kwargs)
            out = _real(*_moved(args, DEVICE), backend=backend, **_moved(kwargs, DEVICE))
            return _moved(out, home)

        monkeypatch.setattr(ops, name, on_device)
    yield
