"""The "cuda" backend's infrastructure: op registration and schemas, shape-only (Meta/fake)
implementations, the Philox keep-mask against the Triton backend's, the verified-kernels record
and how dispatch uses it, and clear errors. Most of it runs without a GPU; the GPU-marked tests
check what only a GPU can (the kernels themselves are covered by the per-op test files, which are
parametrised over backends and devices)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import fastformer
from fastformer import cuda as cuda_backend
from fastformer import dispatch
from fastformer.cuda.source_digest import source_digest
from fastformer.dispatch import Call
from helpers import check_p_rounded_to_a_multiple_of_2_to_the_minus_16

CUDA = torch.device("cuda")

# Every C++ op of the extension and its schema (csrc/*/..._ops.cpp).
SCHEMAS = {
    "cuda_residual_norm_fwd":
        "fastformer::cuda_residual_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
        "float eps, float dropout_p, bool rms, Tensor? seed, bool store_residual) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
    "cuda_residual_norm_bwd":
        "fastformer::cuda_residual_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor normed, "
        "Tensor? weight, Tensor? bias, Tensor rstd, float dropout_p, bool rms, Tensor? seed, "
        "bool has_residual, ScalarType? x_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)",
    "cuda_bias_gelu_fwd":
        "fastformer::cuda_bias_gelu_fwd(Tensor x, Tensor? bias, str approximate, float dropout_p, Tensor? seed) "
        "-> Tensor",
    "cuda_bias_gelu_bwd":
        "fastformer::cuda_bias_gelu_bwd(Tensor grad_out, Tensor x, Tensor? bias, str approximate, "
        "float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
    "cuda_dropout_keep_mask":
        "fastformer::cuda_dropout_keep_mask(Tensor seed, int[] shape, float dropout_p) -> Tensor",
}
OUR_OPS = ("residual_layer_norm", "residual_rms_norm", "bias_gelu")

built = cuda_backend.load_extension() is not None
needs_extension = pytest.mark.skipif(
    not built, reason="fastformer._C is not built here: " + "; ".join(cuda_backend.extension_unavailable_reasons()))


@pytest.fixture
def cuda_available(monkeypatch):
    """The registry as if the cuda backend could run here, with the real op table."""
    monkeypatch.setitem(dispatch._UNAVAILABLE, "cuda", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "cuda", cuda_backend.op_table())


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("FASTFORMER_BUILD_CUDA", "").strip() != "1",
                    reason="the CUDA build is not required here (FASTFORMER_BUILD_CUDA != 1)")
def test_extension_imports_when_the_build_is_required():
    """CI sets FASTFORMER_BUILD_CUDA=1 where nvcc exists: the extension must then be importable."""
    assert built, cuda_backend.extension_unavailable_reasons()


@needs_extension
def test_extension_records_the_sources_it_was_built_from():
    """build_info() carries the digest of csrc/ at build time: this checkout's, which it was built from."""
    assert cuda_backend.extension_build_info()["source_digest"] == source_digest(cuda_backend.CHECKOUT_CSRC)
    assert cuda_backend.extension_stale_reasons() == []


def test_an_extension_built_from_other_sources_is_not_used(monkeypatch, tmp_path):
    """A checkout whose csrc/ changed since the build: the extension counts as unavailable (its
    kernels are not this checkout's) and the launchers say why; the same digest, none (a build
    older than the record) or no csrc/ (an installed wheel) leave it usable."""
    csrc = tmp_path / "csrc"
    (csrc / "op").mkdir(parents=True)
    (csrc / "op" / "kernel.cu").write_text("// the sources built")
    built_from = source_digest(csrc)
    monkeypatch.setattr(cuda_backend, "CHECKOUT_CSRC", csrc)
    monkeypatch.setattr(cuda_backend, "load_extension", lambda: object())

    def stale_reasons(info):
        monkeypatch.setattr(cuda_backend, "extension_build_info", lambda: info)
        monkeypatch.setattr(cuda_backend, "_stale", None)
        return cuda_backend.extension_stale_reasons()

    assert stale_reasons({"source_digest": built_from}) == []
    (csrc / "op" / "kernel.cu").write_text("// edited since")
    assert stale_reasons({}) == []
    [reason] = stale_reasons({"source_digest": built_from})
    assert "other CUDA sources than this checkout's csrc/" in reason and "rebuild" in reason
    assert reason in cuda_backend.extension_unavailable_reasons()
    with pytest.raises(RuntimeError, match="other CUDA sources"):
        cuda_backend.require_extension()
    monkeypatch.setattr(cuda_backend, "CHECKOUT_CSRC", None)
    assert stale_reasons({"source_digest": built_from}) == []


def test_only_a_fastformer_checkout_compares_its_csrc(monkeypatch, tmp_path):
    """An installed copy's parent folder (site-packages) may hold anything, even a csrc/: only a
    folder whose pyproject.toml names fastformer counts as the checkout."""
    assert cuda_backend.CHECKOUT_CSRC == Path(cuda_backend.__file__).resolve().parents[2] / "csrc"
    package = tmp_path / "site-packages" / "fastformer" / "cuda"
    package.mkdir(parents=True)
    (tmp_path / "site-packages" / "csrc").mkdir()
    monkeypatch.setattr(cuda_backend, "__file__", str(package / "__init__.py"))
    assert cuda_backend._checkout_csrc() is None
    (tmp_path / "site-packages" / "pyproject.toml").write_text('[project]\nname = "another"\n')
    assert cuda_backend._checkout_csrc() is None
    (tmp_path / "site-packages" / "pyproject.toml").write_text('[project]\nname = "fastformer"\n')
    assert cuda_backend._checkout_csrc() == tmp_path / "site-packages" / "csrc"


def test_source_digest_follows_the_sources_not_the_docs(tmp_path):
    csrc = tmp_path / "csrc"
    (csrc / "op").mkdir(parents=True)
    (csrc / "op" / "kernel.cu").write_text("x")
    (csrc / "README.md").write_text("a doc")
    first = source_digest(csrc)
    (csrc / "README.md").write_text("another doc")
    assert source_digest(csrc) == first
    (csrc / "op" / "traits.h").write_text("y")
    second = source_digest(csrc)
    assert second != first
    (csrc / "op" / "traits.h").rename(csrc / "op" / "params.h")
    assert source_digest(csrc) not in (first, second)


@needs_extension
def test_every_cuda_op_is_registered_with_its_schema():
    for name, schema in SCHEMAS.items():
        assert hasattr(torch.ops.fastformer, name), name
        assert str(getattr(torch.ops.fastformer, name).default._schema) == schema


@needs_extension
def test_no_unexpected_cuda_ops():
    """Ops the attention kernels add are named cuda_attention*; anything else needs a schema here."""
    registered = {str(s.name).split("::")[1] for s in torch._C._jit_get_all_schemas()
                  if str(s.name).startswith("fastformer::cuda_")}
    unexpected = {name for name in registered - set(SCHEMAS) if not name.startswith("cuda_attention")}
    assert not unexpected, unexpected


@needs_extension
def test_meta_implementations_give_the_output_shapes():
    x = torch.empty(6, 40, device="meta", dtype=torch.bfloat16)
    weight = torch.empty(40, device="meta", dtype=torch.float32)
    out, residual_out, mean, rstd = torch.ops.fastformer.cuda_residual_norm_fwd(
        x, x, weight, weight, 1e-5, 0.1, False, torch.empty((), dtype=torch.int64, device="meta"), True)
    assert out.shape == residual_out.shape == (6, 40) and out.dtype == torch.bfloat16
    assert mean.shape == rstd.shape == (6,) and mean.dtype == rstd.dtype == torch.float32
    out, residual_out, mean, rstd = torch.ops.fastformer.cuda_residual_norm_fwd(
        x, None, None, None, 1e-5, 0.0, True, None, False)
    assert residual_out.numel() == 0 and mean.numel() == 0 and rstd.shape == (6,)
    grads = torch.ops.fastformer.cuda_residual_norm_bwd(x, None, x, weight, None, rstd, 0.0, True, None, True)
    assert [tuple(g.shape) for g in grads] == [(6, 40), (6, 40), (40,), (0,)]
    assert grads[2].dtype == torch.float32
    seed = torch.tensor(5, device="meta")
    assert torch.ops.fastformer.cuda_bias_gelu_fwd(x, None, "tanh", 0.0, None).shape == (6, 40)
    assert torch.ops.fastformer.cuda_bias_gelu_fwd(x, None, "tanh", 0.1, seed).shape == (6, 40)
    grad_x, grad_bias = torch.ops.fastformer.cuda_bias_gelu_bwd(x, x, weight, "none", 0.1, seed)
    assert grad_x.shape == (6, 40) and grad_bias.shape == (40,) and grad_bias.dtype == torch.float32
    keep = torch.ops.fastformer.cuda_dropout_keep_mask(seed, [3, 4], 0.5)
    assert keep.shape == (3, 4) and keep.dtype == torch.bool


@needs_extension
def test_fake_tensors_trace_the_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 24, dtype=torch.float16, device="cuda")
        out, residual_out, mean, rstd = torch.ops.fastformer.cuda_residual_norm_fwd(
            x, x, None, None, 1e-5, 0.0, False, None, True)
        assert out.shape == (5, 24) and out.device.type == "cuda" and rstd.shape == (5,)
        assert torch.ops.fastformer.cuda_bias_gelu_fwd(x, None, "none", 0.0, None).shape == (5, 24)


@needs_extension
def test_opcheck_keep_mask_on_cpu():
    """Schema, fake implementation and AOT tracing of the one op with a CPU implementation."""
    torch.library.opcheck(torch.ops.fastformer.cuda_dropout_keep_mask.default,
                          (torch.tensor(123), [4, 7], 0.3))


@needs_extension
def test_meta_implementations_reject_bad_ranks():
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        torch.ops.fastformer.cuda_residual_norm_fwd(torch.empty(2, 3, 4, device="meta"), None, None,
                                                    None, 1e-5, 0.0, False, None, False)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        torch.ops.fastformer.cuda_bias_gelu_fwd(torch.empty(8, device="meta"), None, "none", 0.0, None)


# ----------------------------------------------------------------------------------------------
# dropout keep-mask: the host Philox against the Triton backend's (interpreter here)
# ----------------------------------------------------------------------------------------------
def _triton_mask_or_skip():
    if dispatch.backend_unavailable_reasons("triton"):
        pytest.skip("triton cannot run here: " + "; ".join(dispatch.backend_unavailable_reasons("triton")))
    from fastformer.triton.dropout import dropout_keep_mask

    return dropout_keep_mask


@needs_extension
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 7, 2**40 + 12345, 2**62 - 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_cpu_matches_triton(seed, p):
    triton_mask = _triton_mask_or_skip()
    from fastformer.cuda.dropout import dropout_keep_mask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = torch.tensor(seed, dtype=torch.int64)
    for shape in [(36, 200), (3, 7, 13), (1,)]:
        expected = triton_mask(seed, shape, p, device).cpu()
        got = dropout_keep_mask(seed, shape, p, "cpu")
        assert got.shape == expected.shape and got.dtype == torch.bool
        assert torch.equal(got, expected), (shape, int(seed), p)


@needs_extension
def test_keep_mask_cpu_rounds_p_to_the_nearest_multiple_of_2_to_the_minus_16():
    from fastformer.cuda.dropout import dropout_keep_mask

    check_p_rounded_to_a_multiple_of_2_to_the_minus_16(
        lambda seed, shape, p: dropout_keep_mask(torch.tensor(seed), shape, p, "cpu"))


@needs_extension
def test_keep_mask_rate_and_edges():
    from fastformer.cuda.dropout import dropout_keep_mask

    keep = dropout_keep_mask(torch.tensor(99), (200, 500), 0.25, "cpu")
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert dropout_keep_mask(torch.tensor(99), (10, 10), 0.0, "cpu").all()
    assert not dropout_keep_mask(torch.tensor(99), (10, 10), 1.0, "cpu").any()
    assert dropout_keep_mask(torch.tensor(99), (0, 5), 0.5, "cpu").shape == (0, 5)
    with pytest.raises(RuntimeError, match="seed must be a 0-dim int64"):
        torch.ops.fastformer.cuda_dropout_keep_mask(torch.tensor([1, 2]), [2], 0.5)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\]"):
        torch.ops.fastformer.cuda_dropout_keep_mask(torch.tensor(1), [2], 1.5)


# ----------------------------------------------------------------------------------------------
# the op table and the verified-kernels record
# ----------------------------------------------------------------------------------------------
def test_shipped_verified_record_is_valid():
    record = cuda_backend.verified_record()
    raw = json.loads(cuda_backend.VERIFIED_RECORD.read_text())
    assert set(raw["verified"]) == set(record)
    for op, entry in record.items():
        assert op in dispatch.OPS
        assert all(entry.get(field) for field in cuda_backend.RECORD_FIELDS), (op, entry)


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"kernels": {}}', "expected"),
    ('{"verified": {"softmax": {}}}', "unknown op 'softmax'"),
    ('{"verified": {"bias_gelu": {"date": "2026-01-01", "gpu": "H200"}}}', "lacks commit, command"),
])
def test_verified_record_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "verified.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        cuda_backend.verified_record(path)


def test_missing_record_file_verifies_nothing(tmp_path):
    assert cuda_backend.verified_record(tmp_path / "absent.json") == {}


def test_op_table_marks_unverified_kernels(monkeypatch):
    monkeypatch.setattr(cuda_backend, "verified_record", lambda: {})
    table = cuda_backend.op_table()
    for op in OUR_OPS:
        support, module = table[op]
        assert module.startswith("fastformer.cuda.")
        assert support.devices == frozenset({"cuda"})
        assert support.not_automatic == (cuda_backend.UNVERIFIED_REASON,)
    assert table["residual_layer_norm"][0].max_hidden == 16384
    import importlib.util

    attention_exists = importlib.util.find_spec("fastformer.cuda.attention") is not None
    assert ("attention" in table) == attention_exists


def test_op_table_skips_missing_modules_and_reports_broken_ones(monkeypatch):
    monkeypatch.setattr(cuda_backend, "verified_record", lambda: {})
    monkeypatch.setattr(cuda_backend, "OP_MODULES", {
        "attention": "fastformer.cuda.no_such_module",
        "bias_gelu": "fastformer.cuda.bias_gelu",
        "residual_layer_norm": "fastformer.cuda.dropout",  # exists, but has no support()
    })
    table = cuda_backend.op_table()
    assert set(table) == {"bias_gelu"}
    assert "residual_layer_norm" in cuda_backend.op_table_errors
    assert "attention" not in cuda_backend.op_table_errors
    monkeypatch.undo()
    cuda_backend.op_table()  # restore op_table_errors


def _record(*ops):
    return {op: {"date": "2026-11-28", "gpu": "NVIDIA H200", "commit": "0123abc",
                 "command": "make test PYTEST_ARGS='-m gpu'"} for op in ops}


@pytest.fixture
def on_an_h100(monkeypatch):
    """The calls below name a CUDA device this machine may not have: dispatch asks its compute
    capability (the triton backend needs 8.0)."""
    monkeypatch.setattr(dispatch, "_compute_capability", lambda device: (9, 0))


def test_automatic_choice_passes_over_unverified_cuda_kernels(monkeypatch, on_an_h100):
    monkeypatch.setattr(cuda_backend, "verified_record", lambda: {})
    monkeypatch.setitem(dispatch._UNAVAILABLE, "cuda", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "cuda", cuda_backend.op_table())
    call = Call("residual_layer_norm", CUDA, torch.bfloat16, frozenset({"residual", "dropout"}), hidden=768)
    assert dispatch.not_supported_reasons("cuda", call, forced=False) == (cuda_backend.UNVERIFIED_REASON,)
    assert dispatch.not_supported_reasons("cuda", call, forced=True) == ()
    selection = dispatch.select_backend(call)
    assert selection.backend != "cuda"
    assert cuda_backend.UNVERIFIED_REASON in selection.rejected["cuda"]
    assert "not yet verified on a GPU" in str(selection)
    forced = dispatch.select_backend(call, "cuda")
    assert forced.backend == "cuda" and forced.forced
    with dispatch.use_backend("cuda"):
        assert dispatch.select_backend(call).backend == "cuda"


def test_verified_kernels_are_chosen_automatically(monkeypatch, on_an_h100):
    monkeypatch.setattr(cuda_backend, "verified_record", lambda: _record("bias_gelu"))
    monkeypatch.setitem(dispatch._UNAVAILABLE, "cuda", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "cuda", cuda_backend.op_table())
    gelu = Call("bias_gelu", CUDA, torch.float16, frozenset({"bias", "tanh"}), hidden=3072)
    assert dispatch.select_backend(gelu).backend == "cuda"
    norm = Call("residual_rms_norm", CUDA, torch.float16, frozenset({"weight"}), hidden=3072)
    assert dispatch.select_backend(norm).backend != "cuda"
    # An unsupported call is still refused, verified or not.
    wide = Call("residual_rms_norm", CUDA, torch.float16, frozenset(), hidden=16385)
    assert any("hidden size 16385" in r for r in dispatch.not_supported_reasons("cuda", wide))


def test_not_automatic_reasons_come_from_data(monkeypatch):
    from fastformer.dispatch import Support

    support = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                      features=frozenset({"erf"}), not_automatic=("reason one", "reason two"))
    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", ())
    monkeypatch.setitem(dispatch._OP_TABLES, "triton", {"bias_gelu": (support, "fastformer.torch_backend.gelu")})
    call = Call("bias_gelu", torch.device("cpu"), torch.float32, hidden=4)
    assert dispatch.not_supported_reasons("triton", call, forced=False) == ("reason one", "reason two")
    assert dispatch.not_supported_reasons("triton", call) == ()
    x = torch.randn(2, 4)
    assert fastformer.explain("bias_gelu", x).backend == "torch"
    assert fastformer.explain("bias_gelu", x, backend="triton").backend == "triton"


def test_info_shows_the_verified_record(monkeypatch, capsys):
    from fastformer import info

    facts = info.collect()
    assert set(facts["cuda_verified"]) == set(dispatch.OPS)
    record = cuda_backend.verified_record()
    for op, entry in facts["cuda_verified"].items():
        assert entry == record.get(op)
    monkeypatch.setattr(cuda_backend, "verified_record", lambda: _record("bias_gelu"))
    info.main([])
    text = capsys.readouterr().out
    assert "CUDA kernels verified on a GPU" in text
    assert "bias_gelu: verified 2026-11-28 on NVIDIA H200 at 0123abc" in text
    assert "residual_layer_norm: not verified" in text


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_launchers_say_why_without_the_extension(monkeypatch):
    from fastformer.cuda import layer_norm

    monkeypatch.setattr(cuda_backend, "load_extension", lambda: None)
    monkeypatch.setattr(cuda_backend, "extension_unavailable_reasons", lambda: ["fastformer._C is not built"])
    with pytest.raises(RuntimeError, match="fastformer._C is not built"):
        layer_norm.residual_norm_fwd(torch.randn(2, 4), None, None, None, 1e-5, 0.0, False, None, False)


@needs_extension
def test_cpu_tensors_are_refused_by_the_cuda_ops(cuda_available):
    x = torch.randn(4, 8)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.fastformer.cuda_bias_gelu_fwd(x, None, "none", 0.0, None)
    with pytest.raises(fastformer.BackendUnavailableError, match="device cpu not supported"):
        fastformer.bias_gelu(x, backend="cuda")


# ----------------------------------------------------------------------------------------------
# on a GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_extension_is_usable_on_this_gpu():
    """Otherwise every cuda-parametrised test would skip: build it (FASTFORMER_BUILD_CUDA=1)."""
    assert cuda_backend.extension_unavailable_reasons() == []
    assert set(OUR_OPS) <= set(dispatch._OP_TABLES["cuda"])


@pytest.mark.gpu
def test_keep_mask_cuda_matches_cpu():
    from fastformer.cuda.dropout import dropout_keep_mask

    for seed in (0, 2**40 + 3):
        seed = torch.tensor(seed)
        assert torch.equal(dropout_keep_mask(seed, (97, 301), 0.3, "cuda").cpu(),
                           dropout_keep_mask(seed, (97, 301), 0.3, "cpu"))


@pytest.mark.gpu
def test_cuda_ops_reject_bad_inputs_clearly():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous columns"):
        torch.ops.fastformer.cuda_residual_norm_fwd(x.t().contiguous().t(), None, None, None, 1e-5, 0.0,
                                                    False, None, False)
    with pytest.raises(RuntimeError, match="N must be in 1..16384"):
        torch.ops.fastformer.cuda_residual_norm_fwd(torch.randn(2, 16385, device="cuda"), None, None,
                                                    None, 1e-5, 0.0, False, None, False)
    with pytest.raises(RuntimeError, match="weight must have the input's dtype"):
        torch.ops.fastformer.cuda_residual_norm_fwd(x.half(), None, torch.ones(64, device="cuda",
                                                    dtype=torch.bfloat16), None, 1e-5, 0.0, False, None, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastformer.cuda_bias_gelu_fwd(x.double(), None, "none", 0.0, None)
    with pytest.raises(RuntimeError, match="approximate must be 'none' or 'tanh'"):
        torch.ops.fastformer.cuda_bias_gelu_fwd(x, None, "sigmoid", 0.0, None)
    with pytest.raises(RuntimeError, match="bias is on cpu"):
        torch.ops.fastformer.cuda_bias_gelu_fwd(x, torch.randn(64), "none", 0.0, None)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1"):
        torch.ops.fastformer.cuda_bias_gelu_fwd(x, None, "none", 1.0, torch.tensor(3, device="cuda"))
    with pytest.raises(RuntimeError, match="seed is on cpu"):
        torch.ops.fastformer.cuda_bias_gelu_bwd(x, x, None, "none", 0.1, torch.tensor(3))


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_backward_is_deterministic_and_paths_agree(norm):
    """Same inputs, same bits (partial sums, no atomics); a misaligned view (scalar path) gives
    the vectorised path's results up to rounding."""
    rows, n = 257, 1536
    base = torch.randn(rows, n + 1, device="cuda", dtype=torch.bfloat16)
    aligned, misaligned = base[:, :n].contiguous(), base[:, 1:]
    weight = torch.randn(n, device="cuda", requires_grad=True)
    bias = torch.randn(n, device="cuda", requires_grad=True) if norm == "layer" else None

    def run(x):
        x = x.detach().requires_grad_()
        if norm == "layer":
            out, res = fastformer.residual_layer_norm(x, None, weight, bias, dropout_p=0.1, backend="cuda")
        else:
            out, res = fastformer.residual_rms_norm(x, None, weight, dropout_p=0.1, backend="cuda")
        grads = torch.autograd.grad((out.float().square().sum() + res.float().sum()),
                                    [t for t in (x, weight, bias) if t is not None])
        return out, grads

    torch.manual_seed(0)
    out1, grads1 = run(aligned)
    torch.manual_seed(0)
    out2, grads2 = run(aligned)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    torch.manual_seed(0)
    out3, grads3 = run(base[:, 1:].contiguous())
    torch.manual_seed(0)
    out4, grads4 = run(misaligned)
    torch.testing.assert_close(out4.float(), out3.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(grads4, grads3):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-1)
