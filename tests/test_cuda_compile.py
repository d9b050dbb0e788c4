"""What the CUDA attention kernels compile to, read from the built extension (no GPU needed: CI
builds the extension for sm_80 and sm_90a). These are properties the kernels were designed for
and that a change could lose with every test of their results still passing:

- the forward holds two m16 tiles of query rows a warp up to head dim 64 (traits.h), so each K or V
  fragment it reads from shared memory feeds the MMAs of both: at most 0.35 ldmatrix per mma.sync
  (0.31 with two tiles, 0.56 with one);
- no attention kernel keeps more than a few values a thread in local memory (spilled registers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import compile_cuda  # noqa: E402

MAX_LDSM_PER_HMMA_TWO_TILES = 0.35
MAX_ATTENTION_STACK_BYTES = 32
# Plain and general variants; the backward's preprocess too, and its dK/dV kernel's mask-gradient variant.
KERNELS_PER_CUBIN = {"fwd": 2, "bwd": 6}


@pytest.fixture(scope="module")
def extension():
    path = compile_cuda.extension_path()
    if path is None:
        pytest.skip("the CUDA extension is not built (FASTFORMER_BUILD_CUDA=0, or no CUDA toolkit)")
    if common.cuobjdump() is None:
        pytest.skip("no cuobjdump (it comes with Triton's wheel on Linux, or with a full CUDA toolkit)")
    return path


@pytest.fixture(scope="module")
def attention_kernels(extension):
    return compile_cuda.read_kernels(extension, "_hdim", sass=False)  # registers and stack


def test_every_attention_cubin_is_read_whole(attention_kernels):
    per_cubin: dict[str, int] = {}
    for kernel in attention_kernels:
        per_cubin[kernel.cubin] = per_cubin.get(kernel.cubin, 0) + 1
    head_dims = {cubin.split("_")[1] for cubin in per_cubin}
    assert head_dims == {"hdim32", "hdim64", "hdim96", "hdim128"}, sorted(per_cubin)
    for cubin, count in per_cubin.items():
        assert count == KERNELS_PER_CUBIN[cubin.split("_")[0]], (cubin, count)
    assert all(k.registers > 0 for k in attention_kernels)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_forward_reads_each_fragment_once_for_two_m16_tiles_up_to_head_dim_64(extension, head_dim):
    forward = compile_cuda.read_kernels(extension, f"fwd_hdim{head_dim}_")
    assert len(forward) == 2 * 2 * len({k.arch for k in forward})  # fp16/bf16 x plain/general per target
    for kernel in forward:
        assert kernel.hmma > 0 and kernel.ldsm / kernel.hmma <= MAX_LDSM_PER_HMMA_TWO_TILES, (
            f"{kernel.cubin} {kernel.name}: {kernel.ldsm} ldmatrix for {kernel.hmma} mma.sync")


def test_attention_kernels_keep_at_most_a_few_values_in_local_memory(attention_kernels):
    spilling = [f"{k.cubin} {k.name}: {k.stack_bytes} bytes" for k in attention_kernels
                if k.stack_bytes > MAX_ATTENTION_STACK_BYTES]
    assert not spilling, spilling


def test_sass_lines_are_counted_by_opcode():
    text = """
        Function : _Z6kernelv
        /*0000*/                   LDSM.16.M88.4 R4, [R2] ;             /* 0x000000000204783b */
        /*0010*/               @!P0 HMMA.16816.F32.BF16 R8, R4, R6, R8 ; /* 0x000000060408723c */
        /*0020*/              @UP1 STL [R1+0x4], R7 ;                  /* 0x0000040701007387 */
        /*0030*/                   IMAD.WIDE.U32 R2, R3, R4, R2 ;       /* 0x0000000403027225 */
        /*0040*/                   IMAD R2, R3, R4, R2 ;                /* 0x0000000403027224 */
        /*0050*/                   EXIT ;                               /* 0x000000000000794d */
    """
    counts = compile_cuda.count_sass(text)
    assert counts == {"_Z6kernelv": {"instructions": 6, "ldsm": 1, "hmma": 1, "local": 1, "imad_hi": 1}}
