"""Backend registry: what each backend supports, declared as data, and the per-call choice.

A call is summarised as a :class:`Call` (device, dtype, sizes and the set of features it needs,
such as ``"dropout"`` or ``"gqa"``). Each backend declares, per op, a :class:`Support` record. The
reasons a backend cannot take a call are derived from those two records alone, so adding a kernel
means adding data, not ``if`` statements.

Selection order for ``backend=None``: the forced backend (``backend=`` argument, then
:func:`use_backend`, then ``FASTFORMER_BACKEND``) if any, otherwise the first backend of
:data:`PREFERENCE` that supports the call. ``"torch"`` supports every valid call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Iterator

import torch

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailableError",
    "Call",
    "PREFERENCE",
    "Selection",
    "Support",
    "backend_unavailable_reasons",
    "get_backend",
    "not_supported_reasons",
    "probe",
    "select_backend",
    "use_backend",
]

BACKEND_NAMES = ("cuda", "triton", "torch")
# Fastest first: hand-written CUDA, then Triton, then the PyTorch composition.
PREFERENCE = BACKEND_NAMES
OPS = ("attention", "residual_layer_norm", "residual_rms_norm", "bias_gelu")

# Human-readable text of each feature a call may need; reasons are built from it.
FEATURES = {
    "dropout": "dropout_p > 0",
    "causal": "is_causal=True",
    "bool_mask": "a boolean attn_mask",
    "float_mask": "an additive float attn_mask",
    "mask_grad": "a gradient for attn_mask (it requires grad)",
    "key_padding_mask": "key_padding_mask",
    "gqa": "grouped-query attention (Hq != Hk)",
    "value_dim": "a value head dim different from the query/key head dim",
    "residual": "a residual input",
    "weight": "a weight",
    "bias": "a bias",
    "tanh": 'approximate="tanh"',
    "erf": 'approximate="none" (erf)',
    "forward_ad": "forward-mode autodiff (torch.func.jvp / jacfwd, torch.autograd.forward_ad)",
}


def func_transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is active: code that branches on a
    tensor's values, or draws random numbers in place, must not run then."""
    return torch._C._are_functorch_transforms_active()


def forward_mode_ad() -> bool:
    """Whether forward-mode autodiff is on (``torch.autograd.forward_ad``'s dual level, which
    torch.func.jvp and jacfwd enter too): only PyTorch's own ops carry tangents. torch.compile
    traces none."""
    return torch.autograd.forward_ad._current_level >= 0


class BackendUnavailableError(ValueError):
    """A forced backend cannot take the call; the message lists every reason."""


@dataclasses.dataclass(frozen=True)
class Call:
    """What a backend must know to decide whether it can take one call of one op."""

    op: str
    device: torch.device
    dtype: torch.dtype
    needs: frozenset = frozenset()
    head_dim: int | None = None  # attention: query/key head dim
    hidden: int | None = None  # norms and bias_gelu: size of the last dim

    def describe(self) -> str:
        parts = [f"{self.device.type}", str(self.dtype).replace("torch.", "")]
        if self.head_dim is not None:
            parts.append(f"head_dim={self.head_dim}")
        if self.hidden is not None:
            parts.append(f"hidden={self.hidden}")
        parts += sorted(self.needs)
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Support:
    """What one backend supports for one op. Anything not listed is not supported."""

    devices: frozenset
    dtypes: frozenset
    features: frozenset = frozenset()
    head_dims: tuple[int, int] | None = None  # inclusive (min, max); None = any
    max_hidden: int | None = None
    min_compute_capability: tuple[int, int] | None = None  # on CUDA devices
    # Devices served only when the backend is forced, never by the automatic choice: Triton's
    # interpreter runs kernels on the CPU for testing, far slower than the torch backend.
    forced_only_devices: frozenset = frozenset()
    # Why the automatic choice passes over this kernel although it can run the call (e.g. a CUDA
    # kernel not yet verified on a GPU); forcing the backend still uses it. Empty: no such reason.
    not_automatic: tuple[str, ...] = ()
    # The devices and dtypes as the reasons name them, joined once: a call traced by torch.compile
    # then reads strings, where iterating a frozenset made torch 2.6's dynamo fail on its guards.
    device_names: str = dataclasses.field(init=False, repr=False, compare=False)
    dtype_names: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "device_names", ", ".join(sorted(self.devices)))
        object.__setattr__(self, "dtype_names", ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes)))


@dataclasses.dataclass
class Backend:
    """One implementation family, described by two functions that :func:`probe` calls once.

    ``ops()`` maps op name -> (Support, implementation module path); ``unavailable_reasons()``
    says why the backend cannot run anything on this machine (empty list when it can).
    ``seed_on_host``: its dropout reads the call's seed on the host (to seed a torch.Generator),
    so the seed is drawn on the CPU; kernel backends read it inside the kernel, from the data's
    device (see :func:`seed_device`).
    """

    name: str
    description: str
    ops: Callable[[], dict[str, tuple[Support, str]]]
    unavailable_reasons: Callable[[], list[str]]
    seed_on_host: bool = False


# --------------------------------------------------------------------------------------------
# The registry. Kernel issues fill in the triton and cuda tables.
# --------------------------------------------------------------------------------------------
_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _torch_ops() -> dict[str, tuple[Support, str]]:
    everything = Support(
        devices=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=_FLOAT_DTYPES,
        features=frozenset(FEATURES),
    )
    return {
        "attention": (everything, "fastformer.torch_backend.attention"),
        "residual_layer_norm": (everything, "fastformer.torch_backend.layer_norm"),
        "residual_rms_norm": (everything, "fastformer.torch_backend.layer_norm"),
        "bias_gelu": (everything, "fastformer.torch_backend.gelu"),
    }


def _triton_ops() -> dict[str, tuple[Support, str]]:
    from fastformer import triton as triton_backend

    return triton_backend.op_table()


def _cuda_ops() -> dict[str, tuple[Support, str]]:
    from fastformer import cuda as cuda_backend

    table = getattr(cuda_backend, "op_table", None)
    return table() if table is not None else {}


def _triton_unavailable_reasons() -> list[str]:
    from fastformer import triton as triton_backend

    return triton_backend.unavailable_reasons()


def _cuda_unavailable_reasons() -> list[str]:
    from fastformer import cuda as cuda_backend

    return cuda_backend.extension_unavailable_reasons()


_REGISTRY: dict[str, Backend] = {
    "cuda": Backend(
        "cuda",
        "hand-written CUDA C++ kernels (the compiled extension fastformer._C)",
        _cuda_ops,
        _cuda_unavailable_reasons,
    ),
    "triton": Backend("triton", "Triton kernels", _triton_ops, _triton_unavailable_reasons),
    "torch": Backend("torch", "composed from PyTorch ops (SDPA, tensor math, gelu)",
                     _torch_ops, lambda: [], seed_on_host=True),
}


def is_backend_name(name) -> bool:
    """Whether ``name`` names a backend (a str first: a list is not even hashable)."""
    return isinstance(name, str) and name in _REGISTRY


def get_backend(name: str) -> Backend:
    if not is_backend_name(name):
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {name!r}")
    return _REGISTRY[name]


def seed_device(backend: str, data_device: torch.device) -> torch.device:
    """Where a call's dropout seed is drawn: on the data's device for the kernel backends, which
    load it in the kernel. Drawn there by PyTorch's generator of that device, it is part of the
    device's work: a CUDA graph replays the draw (a seed drawn on the host during capture would
    be a constant, the same mask at every replay), a compiled graph has no CPU op for it
    (inductor leaves graphs with CPU ops out of its CUDA graphs, or splits them there), and no
    launcher reads a device value on the host."""
    return torch.device("cpu") if get_backend(backend).seed_on_host else data_device


# What probe() found: backend -> reasons it is unavailable, backend -> op table. Filled once, at
# `import fastformer`, so that the per-call path (which torch.compile traces) only reads dicts.
_UNAVAILABLE: dict[str, tuple[str, ...]] = {}
_OP_TABLES: dict[str, dict[str, tuple[Support, str]]] = {}


def probe() -> None:
    """Find out once which backends can run here and what they implement."""
    for name, backend in _REGISTRY.items():
        _UNAVAILABLE[name] = tuple(backend.unavailable_reasons())
        _OP_TABLES[name] = backend.ops()


def backend_unavailable_reasons(name: str) -> tuple[str, ...]:
    """Why backend ``name`` cannot run anything on this machine (empty when it can)."""
    get_backend(name)
    return _UNAVAILABLE[name]


def implementation_module(backend: str, op: str) -> str:
    """The import path of the module implementing ``op`` on ``backend``."""
    return _OP_TABLES[backend][op][1]


def _compute_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def not_supported_reasons(backend: str, call: Call, forced: bool = True) -> tuple[str, ...]:
    """Every reason why ``backend`` cannot take ``call``; empty when it can.

    ``forced=False`` asks for the automatic choice, which also passes over emulated devices and
    kernels whose Support lists ``not_automatic`` reasons (CUDA kernels not yet verified on a GPU).
    """
    reasons = list(backend_unavailable_reasons(backend))
    if reasons:
        return tuple(reasons)
    table = _OP_TABLES[backend]
    if call.op not in table:
        return (f"{call.op} is not implemented by the {backend} backend",)
    support = table[call.op][0]
    if call.device.type not in support.devices:
        reasons.append(f"device {call.device.type} not supported (supports: {support.device_names})")
    elif call.device.type in support.forced_only_devices and not forced:
        reasons.append(f"runs on {call.device.type} only when forced (an emulation for testing)")
    if call.dtype not in support.dtypes:
        reasons.append(f"dtype {str(call.dtype).replace('torch.', '')} not supported "
                       f"(supports: {support.dtype_names})")
    for feature in sorted(f for f in call.needs if f not in support.features):
        reasons.append(f"{FEATURES[feature]} not supported")
    if support.head_dims is not None and call.head_dim is not None:
        low, high = support.head_dims
        if not low <= call.head_dim <= high:
            reasons.append(f"head_dim {call.head_dim} not supported (supports {low}..{high})")
    if support.max_hidden is not None and call.hidden is not None and call.hidden > support.max_hidden:
        reasons.append(f"hidden size {call.hidden} not supported (max {support.max_hidden})")
    if support.min_compute_capability is not None and call.device.type == "cuda":
        capability = _compute_capability(call.device)
        if capability < support.min_compute_capability:
            reasons.append(
                "compute capability %d.%d not supported (needs >= %d.%d)"
                % (*capability, *support.min_compute_capability))
    if not forced:
        reasons += support.not_automatic
    return tuple(reasons)


# --------------------------------------------------------------------------------------------
# Forcing a backend: argument > use_backend() > FASTFORMER_BACKEND
# --------------------------------------------------------------------------------------------
_forced_stack: list[str | None] = []  # the open blocks' names, innermost (latest entered) last
# One per entry of _forced_stack: which block put it there, so that a block ends by removing its own
# entry. Kept apart from the names, so that what the ops read (and torch.compile guards on) is
# still the plain list of names.
_forced_tokens: list[object] = []
_forced_lock = threading.Lock()  # keeps the two lists in step across threads


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` for every fastformer op in this block.

    ``None`` restores the automatic choice inside the block, even if ``FASTFORMER_BACKEND`` is set.
    The ``backend=`` argument of an op still wins. Not thread-local: the latest block entered and
    not yet left, in any thread, is in force. A block that ends removes its own entry, so blocks
    of two threads that overlap without nesting leave each other's setting in place.
    """
    if name is not None:
        get_backend(name)  # validate now, not at the first call
    token = object()
    with _forced_lock:
        _forced_stack.append(name)
        _forced_tokens.append(token)
    try:
        yield
    finally:
        with _forced_lock:
            index = len(_forced_tokens) - 1 - _forced_tokens[::-1].index(token)
            del _forced_stack[index], _forced_tokens[index]


def _env_backend(value: str | None) -> str | None:
    if value is None or value.strip() == "":
        return None
    value = value.strip().lower()
    if value not in _REGISTRY:
        raise ValueError(f"FASTFORMER_BACKEND must be one of {BACKEND_NAMES}, got {value!r}")
    return value


def forced_backend(argument: str | None, op: str = "") -> str | None:
    """The backend the user forced for this call, if any (innermost use_backend(None): none)."""
    if argument is not None:
        if not is_backend_name(argument):
            raise ValueError(f"fastformer.{op}: backend must be one of {BACKEND_NAMES} or None, "
                             f"got {argument!r}")
        return argument
    if _forced_stack:
        return _forced_stack[-1]
    return _env_backend(os.environ.get("FASTFORMER_BACKEND"))


@dataclasses.dataclass(frozen=True)
class Selection:
    """The backend a call goes to, and why the others were passed over."""

    call: Call
    backend: str
    forced: bool
    rejected: dict  # backend name -> tuple of reasons, for every backend not chosen that can't

    def __str__(self) -> str:
        how = "forced" if self.forced else "fastest that supports the call"
        lines = [f"{self.call.op}({self.call.describe()}) -> {self.backend} ({how})"]
        for name, reasons in self.rejected.items():
            lines.append(f"  {name}: passed over")
            lines += [f"    - {reason}" for reason in reasons]
        return "\n".join(lines)


# Selections already made: a pure function of the call, the forced backend and what probe() found.
# The key holds the op tables' identities and the reasons, so that replacing a table (tests do)
# starts afresh; each entry keeps its tables alive, so that no later table can reuse their ids.
_SELECTIONS: dict = {}
_SELECTIONS_KEPT = 4096


def select_backend(call: Call, requested: str | None = None) -> Selection:
    """Choose the backend for ``call``; raise :class:`BackendUnavailableError` if a forced one can't."""
    forced = forced_backend(requested, call.op)
    if torch.compiler.is_compiling():
        # Traced once into the graph, so nothing to cache; and Dynamo before torch 2.14 cannot
        # trace the cache key (id() of a dict).
        return _select(call, forced)
    tables = tuple(_OP_TABLES.values())
    key = (call, forced, tuple(map(id, tables)), tuple(_UNAVAILABLE.values()))
    entry = _SELECTIONS.get(key)
    if entry is None:
        if len(_SELECTIONS) >= _SELECTIONS_KEPT:
            _SELECTIONS.clear()
        entry = _SELECTIONS[key] = (_select(call, forced), tables)
    return entry[0]


def _select(call: Call, forced: str | None) -> Selection:
    if forced is not None:
        reasons = not_supported_reasons(forced, call)
        if reasons:
            listed = "\n".join(f"  - {reason}" for reason in reasons)
            raise BackendUnavailableError(
                f"fastformer.{call.op}: backend {forced!r} cannot take this call "
                f"({call.describe()}):\n{listed}")
        return Selection(call, forced, True, {})
    rejected = {}
    for name in PREFERENCE:
        reasons = not_supported_reasons(name, call, forced=False)
        if not reasons:
            return Selection(call, name, False, rejected)
        rejected[name] = reasons
    raise AssertionError(f"no backend supports {call}: {rejected}")  # torch supports every call
