"""Backend registry and selection: availability, explain(), forcing, precedence, reasons as data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastformer
from fastformer import dispatch
from fastformer.dispatch import FEATURES, Call, Support

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# The CPU-only expectations: no GPU. Tests about a machine without the Triton interpreter too
# use the `no_interpreter` fixture (the test suite itself sets TRITON_INTERPRET=1 on such machines).
ON_GPU = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(ON_GPU, reason="expectations of a machine without a CUDA device")


@pytest.fixture
def no_interpreter(monkeypatch):
    """The registry as probed with TRITON_INTERPRET=0; probed again as it was afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.probe()
    yield
    monkeypatch.undo()
    dispatch.probe()


@pytest.fixture(autouse=True)
def _clean_forcing(monkeypatch):
    monkeypatch.delenv("FASTFORMER_BACKEND", raising=False)
    yield
    leaked = list(dispatch._forced_stack)
    dispatch._forced_stack.clear()  # so that one failure does not cascade into the next tests
    dispatch._forced_tokens.clear()
    assert leaked == [], "use_backend() did not restore the forcing stack"


@pytest.fixture
def triton_fails(monkeypatch):
    """Make sure the triton backend cannot take any call, whatever this machine is.

    On a CPU-only machine this is already true; the patch makes the precedence tests below hold
    on GPU machines and under TRITON_INTERPRET=1 too.
    """
    reason = "triton disabled by the test"
    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", (reason,))
    return reason


def qkv(heads_q=4, heads_k=4, length=6, head_dim=8, device="cpu", dtype=torch.float32):
    return (torch.randn(2, heads_q, length, head_dim, device=device, dtype=dtype),
            torch.randn(2, heads_k, length, head_dim, device=device, dtype=dtype),
            torch.randn(2, heads_k, length, head_dim, device=device, dtype=dtype))


def _x():
    return torch.randn(3, 16)


# op name -> (op, args) for a small valid CPU call of each public op
def op_calls():
    return {
        "attention": (fastformer.attention, qkv()),
        "residual_layer_norm": (fastformer.residual_layer_norm, (_x(), _x(), torch.ones(16), torch.zeros(16))),
        "residual_rms_norm": (fastformer.residual_rms_norm, (_x(), _x(), torch.ones(16))),
        "bias_gelu": (fastformer.bias_gelu, (_x(), torch.zeros(16))),
    }


OPS = list(op_calls())


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------
def test_available_backends_keys_and_torch():
    available = fastformer.available_backends()
    assert set(available) == {"cuda", "triton", "torch"}
    assert available["torch"] == []
    for name, reasons in available.items():
        assert isinstance(reasons, list)
        assert all(isinstance(r, str) and r.strip() for r in reasons), (name, reasons)
        assert tuple(reasons) == dispatch.backend_unavailable_reasons(name)


@cpu_only
def test_cuda_unavailable_without_gpu():
    reasons = fastformer.available_backends()["cuda"]
    assert reasons, "the cuda backend cannot be available without a CUDA device"
    assert any("cuda" in r.lower() for r in reasons)


@cpu_only
def test_triton_unavailable_without_gpu(no_interpreter):
    reasons = fastformer.available_backends()["triton"]
    assert reasons
    assert any("TRITON_INTERPRET" in r or "not installed" in r for r in reasons), reasons


@pytest.mark.parametrize("triton_version, numpy_version, breaks", [
    ("3.6.0", "2.4.0", True), ("3.2.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.0", False), ("3.8.0+git1234", "2.5.0", False), ("3.10.0", "2.4.0", False)])
def test_interpreter_with_numpy_2_4_needs_triton_3_7(monkeypatch, triton_version, numpy_version, breaks):
    """Triton's interpreter before 3.7 fails on NumPy >= 2.4 (triton-lang/triton#9171): the backend
    says so instead of failing inside a kernel."""
    triton = pytest.importorskip("triton")
    import numpy

    from fastformer import triton as triton_backend

    assert triton_backend.interpreter_breaks_on_numpy(triton_version, numpy_version) == breaks
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reasons = triton_backend.unavailable_reasons()
    assert bool(reasons) == breaks
    if breaks:
        assert "numpy<2.4" in reasons[0] and triton_version in reasons[0] and numpy_version in reasons[0]


def test_available_backends_returns_copies():
    fastformer.available_backends()["torch"].append("mutated")
    assert fastformer.available_backends()["torch"] == []


def test_backend_unavailable_error_is_value_error():
    assert issubclass(fastformer.BackendUnavailableError, ValueError)


def test_unknown_backend_name_in_registry_lookups():
    with pytest.raises(ValueError, match="'nope'"):
        dispatch.backend_unavailable_reasons("nope")
    with pytest.raises(ValueError, match="'nope'"):
        dispatch.get_backend("nope")


# ----------------------------------------------------------------------------------------------
# explain / Selection
# ----------------------------------------------------------------------------------------------
@cpu_only
@pytest.mark.parametrize("by_name", [False, True], ids=["function", "name"])
def test_explain_attention_on_cpu(by_name):
    q, k, v = qkv()
    op = "attention" if by_name else fastformer.attention
    selection = fastformer.explain(op, q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert isinstance(selection, dispatch.Selection)
    assert selection.backend == "torch"
    assert selection.forced is False
    assert set(selection.rejected) == {"cuda", "triton"}
    for name, reasons in selection.rejected.items():
        assert reasons, name
        assert tuple(reasons) == dispatch.not_supported_reasons(name, selection.call, forced=False)
    assert selection.call.op == "attention"
    assert selection.call.device == CPU and selection.call.dtype == torch.float32
    assert selection.call.head_dim == 8

    text = str(selection)
    assert text.splitlines()[0].startswith("attention(")
    assert "-> torch" in text and "float32" in text and "head_dim=8" in text
    for name, reasons in selection.rejected.items():
        assert f"{name}: passed over" in text
        for reason in reasons:
            assert reason in text


@cpu_only
@pytest.mark.parametrize("op_name", OPS)
def test_explain_every_op_on_cpu(op_name):
    op, args = op_calls()[op_name]
    for target in (op, op_name):
        selection = fastformer.explain(target, *args)
        assert selection.backend == "torch"
        assert selection.call.op == op_name
        assert set(selection.rejected) == {"cuda", "triton"}
        assert op_name in str(selection)


def test_explain_forced_and_bad_op():
    q, k, v = qkv()
    selection = fastformer.explain(fastformer.attention, q, k, v, backend="torch")
    assert selection.backend == "torch" and selection.forced is True and selection.rejected == {}
    assert "forced" in str(selection)
    with pytest.raises(ValueError, match="op must be one of"):
        fastformer.explain("softmax", q)
    with pytest.raises(ValueError, match="op must be one of"):
        fastformer.explain(torch.nn.functional.gelu, q)


def test_explain_follows_use_backend(triton_fails):
    q, k, v = qkv()
    with fastformer.use_backend("torch"):
        assert fastformer.explain(fastformer.attention, q, k, v).forced is True
    with fastformer.use_backend("triton"):
        with pytest.raises(fastformer.BackendUnavailableError, match=re.escape(triton_fails)):
            fastformer.explain(fastformer.attention, q, k, v)


ATTENTION_NEEDS = [
    # (kwargs for attention with qkv(), qkv kwargs, expected needs)
    ({}, {}, set()),
    ({"dropout_p": 0.1}, {}, {"dropout"}),
    ({"is_causal": True}, {}, {"causal"}),
    ({"attn_mask": torch.ones(6, 6, dtype=torch.bool)}, {}, {"bool_mask"}),
    ({"attn_mask": torch.zeros(6, 6)}, {}, {"float_mask"}),
    ({"attn_mask": torch.zeros(6, 6, requires_grad=True)}, {}, {"float_mask", "mask_grad"}),
    ({"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}, {}, {"key_padding_mask"}),
    ({}, {"heads_k": 2}, {"gqa"}),
]


@pytest.mark.parametrize("kwargs, shape, needs", ATTENTION_NEEDS)
def test_attention_call_needs(kwargs, shape, needs):
    q, k, v = qkv(**shape)
    assert fastformer.explain("attention", q, k, v, **kwargs).call.needs == frozenset(needs)


def test_attention_call_needs_value_dim_and_no_grad_mask():
    q, k, _ = qkv()
    v = torch.randn(2, 4, 6, 12)
    assert fastformer.explain("attention", q, k, v).call.needs == {"value_dim"}
    with torch.no_grad():
        mask = torch.zeros(6, 6, requires_grad=True)
        assert fastformer.explain("attention", q, k, q, attn_mask=mask).call.needs == {"float_mask"}


def test_norm_and_gelu_call_needs():
    x = _x()
    call = fastformer.explain("residual_layer_norm", x, None, None, None).call
    assert call.needs == frozenset() and call.hidden == 16 and call.head_dim is None
    call = fastformer.explain("residual_layer_norm", x, x, torch.ones(16), torch.zeros(16), dropout_p=0.1).call
    assert call.needs == {"residual", "weight", "bias", "dropout"}
    call = fastformer.explain("residual_rms_norm", x, None, torch.ones(16)).call
    assert call.op == "residual_rms_norm" and call.needs == {"weight"}
    assert fastformer.explain("bias_gelu", x).call.needs == {"erf"}
    assert fastformer.explain("bias_gelu", x, torch.zeros(16), "tanh").call.needs == {"bias", "tanh"}


# ----------------------------------------------------------------------------------------------
# forcing a backend that cannot take the call
# ----------------------------------------------------------------------------------------------
def _assert_lists_every_reason(error, backend, call):
    message = str(error)
    reasons = dispatch.not_supported_reasons(backend, call)
    assert reasons
    for reason in reasons:
        assert reason in message, (reason, message)
    assert repr(backend) in message
    assert call.op in message


@pytest.mark.parametrize("op_name", OPS)
def test_forcing_cuda_on_cpu_tensors_fails_with_every_reason(op_name):
    # The cuda backend never takes CPU tensors, whatever the machine.
    op, args = op_calls()[op_name]
    call = fastformer.explain(op, *args, backend="torch").call
    with pytest.raises(fastformer.BackendUnavailableError) as info:
        op(*args, backend="cuda")
    _assert_lists_every_reason(info.value, "cuda", call)
    with pytest.raises(fastformer.BackendUnavailableError):
        fastformer.explain(op, *args, backend="cuda")


@cpu_only
@pytest.mark.parametrize("op_name", OPS)
def test_forcing_triton_on_cpu_fails_with_every_reason(op_name, no_interpreter):
    op, args = op_calls()[op_name]
    call = fastformer.explain(op, *args, backend="torch").call
    with pytest.raises(fastformer.BackendUnavailableError) as info:
        op(*args, backend="triton")
    _assert_lists_every_reason(info.value, "triton", call)


@pytest.mark.parametrize("op_name", OPS)
def test_forcing_torch_works(op_name):
    op, args = op_calls()[op_name]
    out = op(*args, backend="torch")
    reference = op(*args)  # automatic choice: torch here
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# precedence: backend= argument > use_backend() > FASTFORMER_BACKEND
# ----------------------------------------------------------------------------------------------
def _attend(**kwargs):
    return fastformer.attention(*qkv(), **kwargs)


def test_env_var_forces_a_backend(monkeypatch, triton_fails):
    monkeypatch.setenv("FASTFORMER_BACKEND", "triton")
    with pytest.raises(fastformer.BackendUnavailableError, match=re.escape(triton_fails)):
        _attend()
    with pytest.raises(fastformer.BackendUnavailableError):
        fastformer.bias_gelu(_x())
    monkeypatch.setenv("FASTFORMER_BACKEND", " Torch ")  # case and spaces are forgiven
    _attend()
    assert fastformer.explain("attention", *qkv()).forced is True
    monkeypatch.setenv("FASTFORMER_BACKEND", "")  # empty: automatic choice
    assert fastformer.explain("attention", *qkv()).forced is False


def test_use_backend_beats_env_var(monkeypatch, triton_fails):
    monkeypatch.setenv("FASTFORMER_BACKEND", "triton")
    with fastformer.use_backend("torch"):
        _attend()
        fastformer.bias_gelu(_x())
    with pytest.raises(fastformer.BackendUnavailableError):
        _attend()  # the block is over: the env var again
    monkeypatch.setenv("FASTFORMER_BACKEND", "torch")
    with fastformer.use_backend("triton"):
        with pytest.raises(fastformer.BackendUnavailableError, match=re.escape(triton_fails)):
            _attend()
    _attend()


def test_argument_beats_use_backend_and_env_var(monkeypatch, triton_fails):
    monkeypatch.setenv("FASTFORMER_BACKEND", "triton")
    _attend(backend="torch")
    with fastformer.use_backend("triton"):
        _attend(backend="torch")
        fastformer.residual_layer_norm(_x(), None, None, None, backend="torch")
    monkeypatch.setenv("FASTFORMER_BACKEND", "torch")
    with fastformer.use_backend("torch"):
        with pytest.raises(fastformer.BackendUnavailableError, match=re.escape(triton_fails)):
            _attend(backend="triton")


def test_nested_use_backend_restores(monkeypatch, triton_fails):
    with fastformer.use_backend("triton"):
        with pytest.raises(fastformer.BackendUnavailableError):
            _attend()
        with fastformer.use_backend("torch"):
            _attend()
            with fastformer.use_backend("triton"):
                with pytest.raises(fastformer.BackendUnavailableError):
                    _attend()
            _attend()  # inner triton block restored torch
        with pytest.raises(fastformer.BackendUnavailableError):
            _attend()  # torch block restored triton
    _attend()  # nothing forced any more


def test_use_backend_restores_after_exception(triton_fails):
    with fastformer.use_backend("torch"):
        with pytest.raises(RuntimeError, match="boom"):
            with fastformer.use_backend("triton"):
                raise RuntimeError("boom")
        _attend()  # torch again, not triton
        with pytest.raises(fastformer.BackendUnavailableError):
            with fastformer.use_backend("triton"):
                _attend()  # the op's own error also unwinds the block
        _attend()
    assert dispatch.forced_backend(None) is None


def test_use_backend_blocks_of_two_threads_that_overlap_keep_each_others_setting():
    """Global, not thread-local: the latest block entered and not yet left is in force. A enters
    "torch", B enters "triton", A leaves: B's block, still open, keeps "triton" (leaving once
    popped the latest entry, whoever's: A's exit took B's); once B leaves too, nothing is forced."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with fastformer.use_backend("torch"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b():
        a_in.wait(5)
        with fastformer.use_backend("triton"):
            b_in.set()
            a_out.wait(5)
            seen["B after A left"] = dispatch.forced_backend(None)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"B after A left": "triton"}
    assert dispatch.forced_backend(None) is None


def test_use_backend_none_means_automatic(monkeypatch):
    with fastformer.use_backend(None):
        assert fastformer.explain("attention", *qkv()).forced is False
        _attend()
    monkeypatch.setenv("FASTFORMER_BACKEND", "triton")
    with fastformer.use_backend(None):  # also overrides the environment variable
        assert fastformer.explain("attention", *qkv()).forced is False
        _attend()


def test_invalid_env_var_raises_naming_it(monkeypatch):
    monkeypatch.setenv("FASTFORMER_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"FASTFORMER_BACKEND.*'nope'"):
        _attend()
    with pytest.raises(ValueError, match=r"FASTFORMER_BACKEND.*'nope'"):
        fastformer.bias_gelu(_x())
    # an explicit choice does not read the env var
    _attend(backend="torch")
    with fastformer.use_backend("torch"):
        _attend()


def test_use_backend_rejects_unknown_name_on_entry():
    with pytest.raises(ValueError, match="'nope'"):
        with fastformer.use_backend("nope"):
            pytest.fail("the block must not run")
    assert dispatch._forced_stack == []
    with pytest.raises(ValueError, match="'CUDA'"):
        fastformer.use_backend("CUDA").__enter__()
    with pytest.raises(ValueError, match=r"\['torch'\]"):  # not Python's "unhashable type"
        fastformer.use_backend(["torch"]).__enter__()


# ----------------------------------------------------------------------------------------------
# reasons are derived from data: Support x Call
# ----------------------------------------------------------------------------------------------
FAKE_SUPPORT = Support(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16}),
    features=frozenset({"causal", "bool_mask"}),
    head_dims=(16, 128),
)


@pytest.fixture
def fake_triton(monkeypatch):
    """Replace the triton backend's op table by a fake: available, attention only, FAKE_SUPPORT."""
    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "triton",
                        {"attention": (FAKE_SUPPORT, "fastformer.torch_backend.attention")})
    return "triton"


def test_four_reasons_from_support(fake_triton):
    call = Call("attention", CPU, torch.float32, frozenset({"dropout"}), head_dim=200)
    reasons = dispatch.not_supported_reasons(fake_triton, call)
    assert len(reasons) == 4, reasons
    joined = "\n".join(reasons)
    assert any("device" in r and "cpu" in r and "cuda" in r for r in reasons), joined
    assert any("dtype" in r and "float32" in r and "float16" in r for r in reasons), joined
    assert any(FEATURES["dropout"] in r and "dropout_p" in r for r in reasons), joined
    assert any("head_dim" in r and "200" in r and "16" in r and "128" in r for r in reasons), joined


def test_supported_call_has_no_reasons(fake_triton):
    for head_dim in (16, 64, 128):  # both ends of the inclusive range
        call = Call("attention", torch.device("cuda"), torch.float16, frozenset({"causal", "bool_mask"}),
                    head_dim=head_dim)
        assert dispatch.not_supported_reasons(fake_triton, call) == ()
    for head_dim in (15, 129):
        call = Call("attention", torch.device("cuda"), torch.float16, head_dim=head_dim)
        (reason,) = dispatch.not_supported_reasons(fake_triton, call)
        assert "head_dim" in reason and str(head_dim) in reason


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_missing_feature_reason_uses_human_text(monkeypatch, feature):
    support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                      features=frozenset(FEATURES) - {feature})
    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "triton", {"bias_gelu": (support, "unused")})
    call = Call("bias_gelu", CPU, torch.float32, frozenset({feature}), hidden=8)
    reasons = dispatch.not_supported_reasons("triton", call)
    assert reasons == (f"{FEATURES[feature]} not supported",)


def test_unimplemented_op_and_unavailable_backend_reasons(fake_triton, monkeypatch):
    call = Call("bias_gelu", torch.device("cuda"), torch.float16, hidden=8)
    (reason,) = dispatch.not_supported_reasons(fake_triton, call)
    assert "bias_gelu" in reason and "triton" in reason and "not implemented" in reason
    # an unavailable backend answers its unavailability, whatever the call
    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", ("no GPU here", "no compiler either"))
    attention_call = Call("attention", torch.device("cuda"), torch.float16, head_dim=64)
    assert dispatch.not_supported_reasons("triton", attention_call) == ("no GPU here", "no compiler either")


def test_max_hidden_and_compute_capability_reasons(monkeypatch):
    support = Support(devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16}), max_hidden=4096,
                      min_compute_capability=(8, 0))
    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "triton", {"bias_gelu": (support, "unused")})
    monkeypatch.setattr(dispatch, "_compute_capability", lambda device: (7, 5))
    call = Call("bias_gelu", torch.device("cuda"), torch.float16, hidden=8192)
    reasons = dispatch.not_supported_reasons("triton", call)
    assert len(reasons) == 2, reasons
    assert any("hidden" in r and "8192" in r and "4096" in r for r in reasons), reasons
    assert any("compute capability 7.5" in r and "8.0" in r for r in reasons), reasons
    monkeypatch.setattr(dispatch, "_compute_capability", lambda device: (9, 0))
    assert dispatch.not_supported_reasons("triton", Call("bias_gelu", torch.device("cuda"), torch.float16,
                                                         hidden=4096)) == ()


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)],
                         ids=lambda c: "sm_%d%d" % c)
def test_triton_takes_gpus_of_compute_capability_8_0_and_up(monkeypatch, capability):
    """Triton supports compute capability 8.0 and up: on a T4 (7.5) or a V100 (7.0) its tl.dot gets
    no tensor cores, and in bfloat16 Triton 3.2 fails to compile the attention kernels. There every
    op passes over the triton backend (the torch one takes the call) and forcing it says why."""
    pytest.importorskip("triton")
    from fastformer import triton as triton_backend

    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "triton", triton_backend.op_table())
    monkeypatch.setattr(dispatch, "_compute_capability", lambda device: capability)
    for op in OPS:
        sizes = dict(head_dim=64) if op == "attention" else dict(hidden=768)
        call = Call(op, torch.device("cuda"), torch.bfloat16, **sizes)
        reasons = dispatch.not_supported_reasons("triton", call)
        if capability >= (8, 0):
            assert reasons == (), (op, reasons)
        else:
            assert reasons == ("compute capability %d.%d not supported (needs >= 8.0)" % capability,), (op, reasons)


def test_selection_uses_the_tables(fake_triton, monkeypatch):
    """The fake table drives explain() and forcing of real calls, end to end."""
    q, k, v = qkv(head_dim=200)
    selection = fastformer.explain("attention", q, k, v, dropout_p=0.1)
    assert selection.backend == "torch"
    reasons = selection.rejected["triton"]
    assert len(reasons) == 4 and reasons == dispatch.not_supported_reasons("triton", selection.call)
    assert FEATURES["dropout"] + " not supported" in str(selection)
    with pytest.raises(fastformer.BackendUnavailableError) as info:
        fastformer.attention(q, k, v, dropout_p=0.1, backend="triton")
    _assert_lists_every_reason(info.value, "triton", selection.call)

    # A backend that supports the CPU call is preferred over torch (PREFERENCE order) ...
    everything = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                         features=frozenset(FEATURES))
    monkeypatch.setitem(dispatch._OP_TABLES, "triton",
                        {"attention": (everything, "fastformer.torch_backend.attention")})
    selection = fastformer.explain("attention", q, k, v)
    assert selection.backend == "triton" and selection.forced is False
    assert "triton" not in selection.rejected and "torch" not in selection.rejected
    # ... unless torch is forced
    assert fastformer.explain("attention", q, k, v, backend="torch").backend == "torch"


# ----------------------------------------------------------------------------------------------
# python -m fastformer.info
# ----------------------------------------------------------------------------------------------
def test_info_module_prints_backends():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("FASTFORMER_BACKEND", None)
    result = subprocess.run([sys.executable, "-m", "fastformer.info"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    output = result.stdout
    for word in ("torch", "triton", "cuda"):
        assert word in output, output
    for name, reasons in fastformer.available_backends().items():
        status = "unavailable" if reasons else "available"
        assert re.search(rf"^\s*{name}\b.*\b{status}\b", output, re.MULTILINE), (name, status, output)
        for reason in reasons:
            assert reason in output, (reason, output)


def test_info_names_a_bad_backend_variable(monkeypatch):
    """A FASTFORMER_BACKEND that no op would accept is flagged by the report, not first met at
    the first op call."""
    from fastformer import info

    monkeypatch.setenv("FASTFORMER_BACKEND", "cuda-graphs")
    assert any("'cuda-graphs'" in problem for problem in info.collect()["environment_problems"])
    monkeypatch.setenv("FASTFORMER_BACKEND", "Triton ")
    assert info.collect()["environment_problems"] == []


@cpu_only
def test_interpreted_triton_serves_cpu_tensors_only_when_forced(monkeypatch):
    """Under TRITON_INTERPRET=1 the triton backend takes CPU tensors when forced, and the
    automatic choice passes it over with that reason (the interpreter is for tests). Where the
    interpreter cannot run (an old Triton with NumPy >= 2.4), forcing it names that instead."""
    pytest.importorskip("triton")
    from fastformer import triton as triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.probe()
    try:
        x = torch.randn(4, 16)
        broken = triton_backend.unavailable_reasons()
        if broken:
            with pytest.raises(fastformer.BackendUnavailableError, match="triton-lang/triton#9171"):
                fastformer.explain("bias_gelu", x, backend="triton")
        else:
            assert fastformer.explain("bias_gelu", x, backend="triton").backend == "triton"
        selection = fastformer.explain("bias_gelu", x)
        assert selection.backend == "torch"
        expected = broken[0] if broken else "only when forced"
        assert any(expected in reason for reason in selection.rejected["triton"])
    finally:
        monkeypatch.undo()
        dispatch.probe()
