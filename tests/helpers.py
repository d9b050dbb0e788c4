"""Shared test helpers: devices, backends, tolerances (DESIGN.md) and relative-error checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastformer
import reference
from fastformer import dispatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# torch.use_deterministic_algorithms(enabled) for a block, as the benchmarks switch it: the fast
# attention backward sums dQ with float32 atomics unless it is on, so bitwise comparisons of
# attention gradients on a GPU need it.
from common import deterministic_algorithms  # noqa: E402,F401

# Relative error ||out - ref|| / ||ref|| against float64, from DESIGN.md.
ATTENTION_TOL = {torch.float32: (2e-3, 4e-3), torch.bfloat16: (2.5e-2, 5e-2),
                 torch.float16: (2.5e-2, 5e-2), torch.float64: (1e-10, 1e-10)}
ELEMENTWISE_TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 4e-2),
                   torch.float16: (2e-2, 4e-2), torch.float64: (1e-10, 1e-10)}
# Bias and weight gradients of the norms and bias_gelu in half precision.
PARAM_GRAD_TOL_HALF = 2e-1

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = list(dispatch.BACKEND_NAMES)


def require_backend(backend: str, op, *args, **kwargs) -> None:
    """Skip, with the reasons, when ``backend`` cannot take ``op(*args, **kwargs)`` on this machine."""
    try:
        fastformer.explain(op, *args, backend=backend, **kwargs)
    except fastformer.BackendUnavailableError as error:
        pytest.skip(str(error))


def require_available(backend: str | None) -> None:
    """Skip, with the reasons, when ``backend`` cannot run on this machine at all (e.g. Triton's
    interpreter with a NumPy it fails on); None (dispatch's choice) always runs."""
    reasons = [] if backend is None else fastformer.available_backends()[backend]
    if reasons:
        pytest.skip(f"backend {backend!r} is unavailable: " + "; ".join(reasons))


def kernel_device(backend: str | None) -> str:
    """The device whose tensors ``backend`` takes on this machine: the CPU for the torch backend and
    dispatch's choice, and for the triton backend in Triton's interpreter (machines without a
    GPU); the GPU otherwise. Skips, with the reasons, when the backend cannot run here at all."""
    require_available(backend)
    if backend in (None, "torch"):
        return "cpu"
    if backend == "triton":
        from fastformer.triton import interpreter_enabled

        if interpreter_enabled():
            return "cpu"
    return "cuda"


def attention_dtype(backend: str | None) -> torch.dtype:
    """The dtype a test runs ``backend``'s attention in: bfloat16 for the cuda backend, whose
    attention kernels take 16-bit inputs only; float32 otherwise."""
    return torch.bfloat16 if backend == "cuda" else torch.float32


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denominator = expected.norm().item()
    numerator = (actual - expected).norm().item()
    return numerator / denominator if denominator > 0 else numerator


# DESIGN.md: in half precision a kernel's error may be at most a small multiple of the error of
# plain PyTorch computing the same thing in that precision (flash-attention's criterion). Measured
# here (attention): the CUDA kernels on the emulator 0.3-0.9x; the torch backend up to 1.9x (CPU
# SDPA, float16); Triton under its interpreter up to 2.4x in bfloat16, because the interpreter
# (Triton 3.8) casts float32 to bfloat16 by truncation where GPUs round to nearest even.
BASELINE_MULTIPLE = 3.0
HALF_DTYPES = (torch.float16, torch.bfloat16)


def assert_rel_close(actual, expected, tol, what="", baseline=None):
    """||actual - expected|| / ||expected|| <= tol; with ``baseline`` (plain PyTorch's result in
    actual's half dtype), also <= BASELINE_MULTIPLE times the baseline's own error."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = rel_error(actual, expected)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol:.3g}"
    if baseline is not None and actual.dtype in HALF_DTYPES:
        baseline_error = rel_error(baseline, expected)
        bound = max(BASELINE_MULTIPLE * baseline_error, torch.finfo(actual.dtype).eps)
        assert error <= bound, (f"{what}: relative error {error:.3g} > {BASELINE_MULTIPLE} x plain "
                                f"PyTorch's {baseline_error:.3g} in {actual.dtype}")


def assert_grads_close(got, want, tol, what="", baselines=None):
    """Input gradients (of q, k, v and maybe attn_mask) against the reference's: each within
    ``tol`` relative error (and, with ``baselines``, plain PyTorch's gradients in the half dtype,
    BASELINE_MULTIPLE times their error), except those the reference has at zero up to rounding
    (dQ with a single key), which need only be that small relative to the largest gradient."""
    assert len(got) == len(want), f"{what}: {len(got)} gradients, expected {len(want)}"
    scale = max(w.norm().item() for w in want)
    baselines = (None,) * len(want) if baselines is None else baselines
    for name, grad, expected, baseline in zip(("q", "k", "v", "attn_mask"), got, want, baselines):
        assert grad.shape == expected.shape, f"grad {name} {what}: shape {grad.shape} != {expected.shape}"
        assert torch.isfinite(grad).all(), f"grad {name} {what}: non-finite"
        if expected.norm() > 1e-6 * scale:
            assert_rel_close(grad, expected, tol, f"grad {name} {what}", baseline=baseline)
        else:
            assert grad.double().norm() <= tol * scale, f"grad {name} {what}"


def graph_breaks(fn, *args, **kwargs) -> dict:
    """{reason: count} of the graph breaks torch.compile (backend "eager") meets running
    ``fn(*args, **kwargs)``; empty when it traces as one graph. Read from dynamo's own counters,
    which torch 2.6 to 2.14 all keep (a plain compiled call, unlike torch._dynamo.explain)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.compile(fn, backend="eager")(*args, **kwargs)
    return dict(counters["graph_break"])


def keep_mask_function(backend: str, monkeypatch):
    """The backend's debug path: ``f(seed, shape, dropout_p, device)`` -> the bool keep-mask its
    kernels regenerate for a tensor of ``shape`` (flattened to rows of its last dim).

    The torch backend uses that mask inside the custom op and its autograd.Function (as under
    torch.compile); in plain eager mode it runs PyTorch's own dropout under PyTorch's autograd, so
    the test is switched to the Function path.
    """
    if backend == "torch":
        from fastformer import library

        monkeypatch.setattr(library, "NATIVE_AUTOGRAD", False)
        from fastformer.torch_backend.dropout import dropout_keep_mask
    elif backend == "triton":
        from fastformer.triton.dropout import dropout_keep_mask
    elif backend == "cuda":
        from fastformer.cuda.dropout import dropout_keep_mask
    else:
        pytest.skip(f"no keep-mask debug path for the {backend} backend yet")
    return dropout_keep_mask


def check_p_rounded_to_a_multiple_of_2_to_the_minus_16(keep_mask) -> None:
    """``keep_mask(seed, shape, p)`` -> bool keep-mask: the kernels' masks round p to the nearest
    multiple of 2^-16, as the documented mask does (``reference.rounding_probes``: a mask that
    truncates p, or rounds it up, fails)."""
    seed, shape = 321, (3, 29)
    p_drops, p_keeps = reference.rounding_probes(seed, shape)
    for p, kept in ((p_drops, False), (p_keeps, True)):
        keep = keep_mask(seed, shape, p).cpu()
        assert bool(keep.reshape(-1)[0]) is kept and torch.equal(keep, reference.philox_keep_mask(seed, shape, p)), p


def record_bias_gelu_biases(monkeypatch) -> list:
    """The ``bias`` argument of every ``fastformer.bias_gelu`` call from now on, in order."""
    biases = []
    real = fastformer.bias_gelu

    def spy(x, bias=None, *args, **kwargs):
        biases.append(bias)
        return real(x, bias, *args, **kwargs)

    monkeypatch.setattr(fastformer, "bias_gelu", spy)
    return biases


def offset_by(t: torch.Tensor, elements: int) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts ``elements`` past an allocation's start (which
    is 16-byte aligned)."""
    buffer = torch.empty(t.numel() + elements, device=t.device, dtype=t.dtype)
    return buffer[elements:].view(t.shape).copy_(t)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` one element off an allocation's start: no 16-byte vector access fits its rows, so
    kernels take their scalar path."""
    return offset_by(t, 1)


def in_memory_order(t: torch.Tensor, order) -> torch.Tensor:
    """A copy of ``t`` with the same shape whose memory nests its dims as ``order`` lists them
    (outermost first): e.g. (0, 2, 1, 3) makes a (B, H, L, D) tensor a view of (B, L, H, D) memory."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.permute(order).contiguous().permute(inverse)


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values on the host made while it is active: ``.item()``,
    ``int(t)``, ``bool(t.all())`` (``aten._local_scalar_dense``), ``torch.equal`` and
    ``aten.is_nonzero``. On a GPU each waits for the device, and inside CUDA graph capture it is
    an error or, for a value drawn on the host, a constant. (A CPU test cannot see copies to the
    host, which are no-ops there.)"""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
             torch.ops.aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class ZeroFills(TorchDispatchMode):
    """Records the tensors filled with zeros while it is active (``torch.zeros``, ``zeros_like``,
    ``new_zeros``, ``zero_``, ``fill_(0)``, and the backward of ``select`` and of slicing, which
    zero-fill a gradient of their whole input to copy their part in), as (op, shape): on a GPU
    each is an allocation and a memset launch, and a zero gradient read back by a kernel is memory
    traffic for nothing."""

    FILLS = {"zeros", "zeros_like", "new_zeros", "zero_", "select_backward", "slice_backward"}

    def __init__(self):
        super().__init__()
        self.fills = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.FILLS or (name == "fill_" and args[1] == 0):
            self.fills.append((name, tuple(out.shape)))
        return out


class Copies(TorchDispatchMode):
    """Records the copies of tensors made while it is active (``clone``, ``copy_``, ``_to_copy``:
    what ``contiguous()``, a ``reshape()`` that cannot view and ``.to()`` dispatch to), as (op,
    shape): on a GPU each is a kernel reading and writing the whole tensor. Leaves out what Triton's
    interpreter copies around each kernel it runs (its host copies of the arguments), which a GPU
    does not do."""

    COPIES = {"clone", "copy_", "_to_copy"}

    def __init__(self):
        super().__init__()
        self.copies = []
        self._in_kernel = 0

    def __enter__(self):
        self._executor = _triton_grid_executor()
        if self._executor is not None:
            run_kernel = self._run_kernel = self._executor.__call__
            mode = self

            def call(executor, *args, **kwargs):
                mode._in_kernel += 1
                try:
                    return run_kernel(executor, *args, **kwargs)
                finally:
                    mode._in_kernel -= 1
            self._executor.__call__ = call
        return super().__enter__()

    def __exit__(self, *exc):
        if self._executor is not None:
            self._executor.__call__ = self._run_kernel
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._in_kernel and func.overloadpacket.__name__ in self.COPIES:
            self.copies.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


def _triton_grid_executor():
    """Triton's interpreter class that runs a kernel launch, or None without Triton."""
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        return None
    return GridExecutor


def seeded_gradients(loss_function, params, seed: int = 123) -> list:
    """The gradients of ``params`` (zeros where one gets none) from ``loss_function().backward()``
    after ``torch.manual_seed(seed)``: runs that must draw the same dropout masks, compared.
    Through .backward(), which reentrant checkpointing needs (it refuses torch.autograd.grad)."""
    for t in params:
        t.grad = None
    torch.manual_seed(seed)
    loss_function().backward()
    return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in params]


class LoRALinear(torch.nn.Module):
    """A low-rank adapter around a Linear, as peft puts in place of one: it exposes the wrapped
    layer's weight and bias, but its forward adds more."""

    def __init__(self, base: torch.nn.Linear, rank=2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        torch.nn.init.normal_(self.up.weight)

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))
