"""Comparison helpers that say what differs, not just `False`."""

from __future__ import annotations

import torch


def assert_close(actual, expected, *, atol: float = 0.0, rtol: float = 0.0, name: str = "") -> None:
    """torch.testing.assert_close with a report of how many elements mismatch and the first few."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    if a.is_floating_point():
        a64, e64 = a.double(), e.double()
        bad = ~((a64 - e64).abs() <= atol + rtol * e64.abs())
        bad &= ~(torch.isnan(a64) & torch.isnan(e64))
    else:
        bad = a != e
    if bad.any():
        idx = bad.nonzero()[:8]
        rows = [
            f"  at {tuple(i.tolist())}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}"
            for i in idx
        ]
        worst = ""
        if a.is_floating_point():
            worst = f", max abs error {(a.double() - e.double()).abs().max().item():.3g}"
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements mismatch "
            f"(atol={atol}, rtol={rtol}{worst}); first ones:\n" + "\n".join(rows)
        )


# Tolerances for comparing a kernel with the reference in the same dtype. float32: both
# accumulate in float32 but in different orders, so a few ulps of the magnitudes involved.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def single_thread():
    """Generator for a fixture: torch on one thread, restored after. For tests of small models:
    on a shared machine a second thread's wake-ups cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
