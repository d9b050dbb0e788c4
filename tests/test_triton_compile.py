"""The Triton kernels compile for the GPUs they run on, checked on a machine without one.

The interpreter tests check what the kernels compute; they never lower a kernel to a GPU.
``benchmarks/compile_triton.py`` calls the real launchers with Triton's driver replaced by one that
compiles for sm_90 / sm_80 and launches nothing: every kernel, autotune configuration and
compile-time switch the launchers produce must compile, some configuration of every launch must fit
in the target's shared memory, the attention kernels must use tensor cores, and rows that are only
4- or 16-byte aligned (head dim 50, hidden size 200) must still be loaded in vectors. Another test
checks that the script reports what it claims to (compile errors, shared memory, missing kernels),
and the last one that every attention launch also runs on a GPU with 99 KiB of shared memory a
block (sm_89), through a fallback where no configuration fits.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "compile_triton.py"


def _run(args, cwd, timeout):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # kernels must be JIT functions, compiled, not interpreted
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def _join_then_transpose() -> bool:
    from fastformer.triton import dropout

    return bool(dropout._JOIN_THEN_TRANSPOSE)


def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    report = tmp_path / "compile.json"
    # A cold run compiles about 250 kernels (minutes on two cores); Triton's cache makes reruns fast.
    result = _run([str(SCRIPT), "--arch", "90", "--arch", "80", "--json", str(report)], ROOT, 3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    payload = json.loads(report.read_text())
    assert payload["problems"] == []
    kernels = payload["kernels"]
    assert all(k["error"] is None for k in kernels)
    for arch in (90, 80):
        names = {k["kernel"] for k in kernels if k["arch"] == arch}
        assert {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
                "_residual_norm_fwd_kernel", "_residual_norm_bwd_kernel", "_bias_gelu_fwd_kernel",
                "_bias_gelu_bwd_kernel"} <= names
        matmul_kernels = [k for k in kernels if k["arch"] == arch and k["kernel"] in
                          ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")]
        assert all(k["mma"] for k in matmul_kernels), "an attention kernel compiled without tensor cores"
        assert (arch == 90) == any(k["mma"] == "wgmma" for k in matmul_kernels)
        # the dK/dV kernel with atomic dQ (the default) and without (deterministic mode, with the dQ kernel)
        assert {k["constants"]["ATOMIC_DQ"] for k in matmul_kernels if k["kernel"] == "_attention_bwd_dkdv_kernel"} \
            == {True, False}
        # and each way of writing a float mask's gradient (none, stored, added, summed a key then added)
        assert {k["constants"]["MASK_GRAD"] for k in matmul_kernels if k["kernel"] == "_attention_bwd_dkdv_kernel"} \
            == {0, 1, 2, 3}
        # Float32 products are plain TF32 only where PyTorch's switch allows it (the " tf32 " case).
        float32 = {k["case"]: k["constants"]["DOT_PRECISION"] for k in matmul_kernels if " fp32 " in k["case"]}
        assert float32 and all(precision == ("tf32" if " tf32 " in case else "tf32x3")
                               for case, precision in float32.items()), float32
        # Rows of head dim 50 (d_model 200, 4 heads) are only 4-byte aligned, and Triton cannot see
        # even that without the launchers' ALIGN hints: then every element is its own load and the
        # multi-stage loops get no cp.async pipelining.
        head_dim_50 = [k for k in matmul_kernels
                       if k["case"].startswith("attention fp16 d50") and k["num_stages"] > 1]
        assert head_dim_50 and all(k["load_bytes"] >= 4 and k["async_copy_bytes"] >= 4 for k in head_dim_50)
        hidden_200 = [k for k in kernels
                      if k["arch"] == arch and k["case"] == "layer_norm fp32 N200 residual dropout"]
        assert hidden_200 and all(k["load_bytes"] >= 8 for k in hidden_200)  # 16-byte rows: vectors
        # Dropout's Philox-4x32-10 (20 mul.hi a call) is compiled in only with dropout, and an
        # attention thread draws its share of one call per 8 scores, ceil(BLOCK_M BLOCK_N / 8 /
        # threads) calls, not a multiple of it (a mask laid out so that threads repeat each
        # other's calls would be; Triton 3.2 and 3.3 do that in the dK/dV kernel's transposed one),
        # in each compiled copy of the tile loop: the forward has two (tiles without a mask, then
        # the others).
        with_dropout = 0
        for k in kernels:
            if k["arch"] != arch or "HAS_DROPOUT" not in k["constants"]:
                continue
            if not k["constants"]["HAS_DROPOUT"]:
                assert k["mul_hi"] == 0, k
                continue
            assert k["mul_hi"] >= 20, k
            if k["kernel"] in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel") or (
                    k["kernel"] == "_attention_bwd_dkdv_kernel" and _join_then_transpose()):
                tile = k["constants"]["BLOCK_M"] * k["constants"]["BLOCK_N"]
                calls = math.ceil(tile / 8 / (32 * k["num_warps"]))
                loops = 2 if k["kernel"] == "_attention_fwd_kernel" else 1
                assert k["mul_hi"] <= 22 * calls * loops, (k["kernel"], k["constants"], k["num_warps"], k["mul_hi"])
                with_dropout += 1
        assert with_dropout >= 10


def test_tests_launch_one_attention_config_unless_told(tmp_path):
    """FASTFORMER_TRITON_AUTOTUNE=0 (the test suite's setting) compiles one config per attention
    launch, the small one; use_config(i) picks config i; unset, the autotuner compiles them all."""
    (tmp_path / "fixed_config.py").write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import compile_triton
        from fastformer.triton import attention

        def blocks(autotune, index=None):
            os.environ["FASTFORMER_TRITON_AUTOTUNE"] = autotune
            with compile_triton.compile_only(90) as recorder:
                recorder.case = autotune
                q = torch.empty(2, 4, 200, 64, dtype=torch.float16)
                if index is None:
                    attention.attention_fwd(q, q, q, None, None, 0.0, False, 0.125, None)
                else:
                    with attention.use_config(index):
                        attention.attention_fwd(q, q, q, None, None, 0.0, False, 0.125, None)
            return [[r.constants["BLOCK_M"], r.constants["BLOCK_N"], r.num_warps, r.num_stages]
                    for r in recorder.results]

        print(json.dumps({{"fixed": blocks("0"), "first": blocks("0", 0), "autotuned": blocks("1"),
                          "configs": attention._configs("fwd", 64)}}))
    """))
    result = _run(["fixed_config.py"], tmp_path, 900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    launched = json.loads(result.stdout.strip().splitlines()[-1])
    configs = launched["configs"]
    assert launched["fixed"] == [configs[-1]] and launched["first"] == [configs[0]]
    assert launched["autotuned"] == configs and len(configs) > 2


def test_a_new_tuning_key_compiles_its_configs_on_threads_before_the_autotuner_times_them(tmp_path):
    """Autotuning on (FASTFORMER_TRITON_AUTOTUNE=1), two compile threads: the first launch of a
    tuning key compiles every config of the forward once, before the autotuner's loop, and on more
    than one thread; the autotuner then compiles nothing (the kernels it asks for are the ones
    compiled, same specialisation and options). A second launch of that key compiles nothing."""
    (tmp_path / "precompile.py").write_text(textwrap.dedent(f"""
        import json, os, sys, threading
        import torch
        import triton.compiler
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import compile_triton
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.driver import driver
        from fastformer.triton import attention

        os.environ["FASTFORMER_TRITON_AUTOTUNE"] = "1"
        os.environ["FASTFORMER_TRITON_COMPILE_WORKERS"] = "2"  # compile_triton sets 1 for itself
        compiles, seen = [], {{}}
        compile = triton.compiler.compile  # what a JIT function takes when it first runs

        def counted(*args, **kwargs):
            compiles.append(threading.get_ident())
            return compile(*args, **kwargs)

        def timing_loop(self, *args, grid=None, warmup=False, **kwargs):  # the autotuner's, no GPU
            seen["before"] = len(compiles)
            for config in self.configs:
                self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
            seen["after"] = len(compiles)

        triton.compiler.compile, Autotuner.run = counted, timing_loop
        driver.set_active(compile_triton._CompileOnlyDriver(90))
        q = torch.empty(2, 4, 200, 64, dtype=torch.bfloat16)
        attention.attention_fwd(q, q, q, None, None, 0.0, False, 0.125, None)
        first = dict(seen, threads=len(set(compiles)))
        attention.attention_fwd(q, q, q, None, None, 0.0, False, 0.125, None)
        print(json.dumps({{"first": first, "total": len(compiles), "configs": len(attention._configs("fwd", 64))}}))
    """))
    result = _run(["precompile.py"], tmp_path, 900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    configs = counts["configs"]
    assert counts["first"]["before"] == counts["first"]["after"] == configs > 2
    assert counts["first"]["threads"] >= 2
    assert counts["total"] == configs


def test_report_names_compile_errors_shared_memory_and_missing_kernels(tmp_path):
    (tmp_path / "bad_kernels.py").write_text(textwrap.dedent(f"""
        import json, sys
        import torch
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import compile_triton
        import triton
        import triton.language as tl


        @triton.jit
        def _double_kernel(X, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)  # a power of two, or no compile
            tl.store(X + offsets, tl.load(X + offsets) * 2)


        @triton.jit
        def _square_matmul_kernel(A, B, C, BLOCK: tl.constexpr):
            rows = tl.arange(0, BLOCK)
            tile = rows[:, None] * BLOCK + rows[None, :]
            tl.store(C + tile, tl.dot(tl.load(A + tile), tl.load(B + tile)))


        x = torch.empty(256 * 256, dtype=torch.float16)
        with compile_triton.compile_only(90) as recorder:
            recorder.case = "bad"
            _double_kernel[(1,)](x, BLOCK=48)
            _double_kernel[(1,)](x, BLOCK=64)
            try:  # raises, as a launch that does not fit does on a GPU
                _square_matmul_kernel[(1,)](x, x, x.float(), BLOCK=256)  # 2 x 128 KiB of operands
                raised = None
            except compile_triton.OutOfResources as exc:
                raised = str(exc)
            _square_matmul_kernel[(1,)](x, x, x.float(), BLOCK=32)
        print(json.dumps([raised, compile_triton.problems(recorder.results, {{"_double_kernel", "_absent_kernel"}})]))
    """))
    result = _run(["bad_kernels.py"], tmp_path, 600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    raised, problems = json.loads(result.stdout.strip().splitlines()[-1])
    assert raised and "shared memory" in raised
    assert len(problems) == 3, problems
    assert "_double_kernel {'BLOCK': 48}" in problems[0] and "power of 2" in problems[0]
    assert "_square_matmul_kernel" in problems[1] and "no configuration fits in 232448 bytes" in problems[1]
    assert problems[2] == "sm_90: no case compiled _absent_kernel"


def test_every_attention_launch_runs_on_a_gpu_with_99_kib_of_shared_memory(tmp_path):
    """sm_89 (as sm_86 and sm_120: RTX 30xx-50xx, A10, L4, L40S) gives a block 99 KiB of shared
    memory, the least of the GPUs Triton supports. The last config of each list (what
    FASTFORMER_TRITON_AUTOTUNE=0 launches, and the autotuner's last resort) must fit there in
    float32, the widest dtype, for every head-dim class, with atomic dQ and without (deterministic
    mode), masks, mask gradients and dropout. The one launch allowed not to fit, the dK/dV kernel
    with atomic dQ in float32 at head dims over 128, raises OutOfResources there as on a GPU (the
    compile-only driver does what Triton does at a launch), and attention_bwd must then take the
    dQ kernel instead."""
    (tmp_path / "small_gpu.py").write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import compile_triton

        os.environ["FASTFORMER_TRITON_AUTOTUNE"] = "0"  # each launch: its list's last config
        cases = {{}}
        for dim in (64, 128, 256):
            case = compile_triton.attention_case
            cases[f"d{{dim}} gqa float-mask mask-grad"] = case(torch.float32, dim, heads_k=2, mask="float",
                                                               mask_grad=True)
            cases[f"d{{dim}} causal padding dropout"] = case(torch.float32, dim, causal=True, padding=True,
                                                             mask="bool", dropout=0.1)
            cases[f"d{{dim}} deterministic"] = case(torch.float32, dim, mask="float", mask_grad=True, dropout=0.1,
                                                    deterministic=True)
        results, stopped = compile_triton.compile_cases(89, cases)
        print(json.dumps({{"stopped": stopped, "problems": compile_triton.problems(results, set()),
                          "records": [dict(case=r.case, kernel=r.kernel, atomic=r.constants.get("ATOMIC_DQ"),
                                           block_d=r.constants.get("BLOCK_D"), fits=r.fits, fell_back=r.fell_back)
                                      for r in results]}}))
    """))
    result = _run(["small_gpu.py"], tmp_path, 1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["stopped"] == [] and report["problems"] == [], report
    records = report["records"]
    assert len({r["case"] for r in records}) == 9  # every case compiled something
    for r in records:
        assert r["fits"] or (r["fell_back"] and r["kernel"] == "_attention_bwd_dkdv_kernel" and r["atomic"]
                             and r["block_d"] == 256), r
    for case in {r["case"] for r in records}:
        fitting = {r["kernel"] for r in records if r["case"] == case and r["fits"]}
        assert {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel"} <= fitting, case
        if "deterministic" in case or any(r["fell_back"] for r in records if r["case"] == case):
            assert "_attention_bwd_dq_kernel" in fitting, case
