"""Every Triton kernel compiles for the H100 (sm_90), and a decode step's for the cards people
have (T4 sm_75, RTX 30 sm_86, RTX 40 sm_89), without a GPU.

The interpreter (TRITON_INTERPRET=1, what the other kernel tests use on the CPU) runs the
kernels as numpy and accepts code that the real compiler rejects (a constexpr assigned in
an unrolled loop, say). Compiling ahead of time for a CUDA target needs only triton and its
bundled ptxas, so CI catches those errors before a GPU ever sees the code."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a triton without the AOT API
    pytest.skip("this triton has no ahead-of-time compile API", allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)


def _fresh_process() -> bool:
    """@triton.jit reads TRITON_INTERPRET when a kernel is decorated: after the interpreter
    tests (tests/runtime/test_kernels.py) the kernel objects in this process are interpreted
    functions, which cannot be compiled ahead of time."""
    from triton.runtime.jit import JITFunction

    from runtime.kernels.triton_decode import norm_kernel
    from runtime.kernels.triton_dequant import dequant_kernel
    from runtime.kernels.triton_gemm import qgemm_kernel
    from runtime.kernels.triton_gemv import qgemv_kernel

    return all(isinstance(k, JITFunction) for k in (qgemv_kernel, dequant_kernel, qgemm_kernel, norm_kernel))


@pytest.fixture(scope="module", autouse=True)
def _compiled_in_a_clean_process(request):
    """Run this module again in a subprocess without TRITON_INTERPRET when this process has
    interpreted kernels; the in-process tests then skip (the subprocess ran them)."""
    import os
    import subprocess
    import sys

    if os.environ.get("MOEPACK_AOT_CHILD") or _fresh_process():
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"MOEPACK_AOT_CHILD": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.path.as_posix()],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    pytest.skip("compiled in a clean subprocess (this process has interpreted kernels): passed")


def _compile(fn, types: dict[str, str], constexprs: dict, target=SM90):
    sig = {name: types.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in types and n not in constexprs and n.endswith("_ptr")]
    assert not missing, f"no pointer type given for {missing}"
    try:
        return triton.compile(ASTSource(fn, sig, constexprs), target=target)
    except RuntimeError as e:  # no CUDA backend or ptxas in this triton build
        if "backend" in str(e).lower() or "ptxas" in str(e).lower():
            pytest.skip(f"triton cannot compile for CUDA here: {e}")
        raise


def _gemv_types(bits: int, mb: int, act: str) -> dict[str, str]:
    meta = "*u8" if mb != 16 else "*fp16"
    t = {"x_ptr": act, "out_ptr": act, "out2_ptr": act, "sel_ptr": "*i64", "w_ptr": "*fp16"}
    for m in "ab":
        t |= {f"q{m}_ptr": "*i32", f"qh{m}_ptr": "*i16", f"s{m}_ptr": meta, f"z{m}_ptr": meta,
              f"sm{m}_ptr": "*fp32", f"zm{m}_ptr": "*fp32"}
    return t


@pytest.mark.parametrize("bits,g,mb,gated,partial,permuted,t,even,row_meta,indexed", [
    (2, 16, 8, True, False, True, 1, True, True, False),
    (2, 16, 8, False, True, True, 1, False, False, False),
    (3, 64, 8, True, False, True, 2, True, True, False),
    (3, 64, 16, False, False, False, 4, False, False, False),
    (4, 64, 8, False, True, True, 8, True, False, False),
    (4, 128, 16, True, False, False, 1, False, False, False),
    (8, 64, 8, False, False, False, 3, True, True, False),
    (2, 16, 8, True, False, True, 1, True, True, True),  # indexed w1/w3, scaled by the router weight
    (3, 64, 8, True, True, True, 1, True, True, True),  # indexed gated split-K
    (2, 16, 8, False, True, True, 1, True, True, True),  # indexed w2: partials summed over experts
    (2, 16, 4, True, False, True, 1, True, True, True),  # 4-bit meta codes (format version 2)
    (3, 64, 4, True, True, True, 1, True, False, True),
    (2, 16, 4, False, True, True, 1, False, False, False),
])
@pytest.mark.parametrize("int_x", [False, True], ids=["float-x", "int16-x"])
def test_qgemv_compiles_for_sm90(bits, g, mb, gated, partial, permuted, t, even, row_meta, indexed, int_x):
    from runtime.kernels.triton_gemv import qgemv_kernel

    act = "*fp32" if partial else "*fp16"
    bt = 1 << max(0, (t - 1).bit_length())
    k = _compile(qgemv_kernel, _gemv_types(bits, mb, act) | {"x_ptr": "*i32" if int_x else "*fp16"},
                 dict(K=4096, MG=128 if mb != 16 else 1, TILES=4, T=t, BT=bt, BITS=bits, G=g, MB=mb, BLOCK_N=16, BLOCK_K=256,
                      X_PERMUTED=permuted and not int_x, GATED=gated, PARTIAL=partial,
                      OUT_PER=1 if partial or int_x else 16, EVEN=even, ROW_META=row_meta, INDEXED=indexed,
                      SCALED=indexed and gated and not partial, INT_X=int_x, ASM=True, OUT_INT=0))
    ptx = k.asm["ptx"]
    assert "ld.global" in ptx
    # the int16 path multiplies with dp2a (signed 16-bit activations, unsigned byte codes), the
    # float path never does
    assert ("dp2a.lo.s32.u32" in ptx and "dp2a.hi.s32.u32" in ptx) == int_x


@pytest.mark.parametrize("bits,g,mb,t,row_meta,loads", [
    (2, 16, 4, 1, True, {"u8"}),  # the quantizer's 2-bit experts: two groups' codes a byte
    (4, 64, 8, 1, True, {"u8"}),  # attention: a group spans 8 words
    (2, 16, 8, 1, False, {"u8", "f32"}),  # (step, min) read per word
    (3, 64, 16, 1, False, {"b16"}),  # f16 scales and zeros
    (2, 16, 8, 1, True, set()),  # one 8-bit code per word: contiguous, a plain vector load
    (2, 16, 4, 4, True, set()),  # several tokens: the plain load (a gather costs more there)
])
def test_repeated_meta_addresses_load_through_inline_asm_at_one_token(bits, g, mb, t, row_meta, loads):
    """_gather: where each word reads a scale address that its neighbours read too, the
    one-token integer GEMV loads it with ld.global.nc in inline assembly, which takes the words'
    layout in every triton (3.6 converted its accumulator through shared memory each tile)."""
    from runtime.kernels.triton_gemv import qgemv_kernel

    bt = 1 << max(0, (t - 1).bit_length())
    k = _compile(qgemv_kernel, _gemv_types(bits, mb, "*fp16") | {"x_ptr": "*i32"},
                 dict(K=4096, MG=128 if mb != 16 else 1, TILES=8, T=t, BT=bt, BITS=bits, G=g, MB=mb, BLOCK_N=16,
                      BLOCK_K=512, X_PERMUTED=False, GATED=True, PARTIAL=False, OUT_PER=1, EVEN=True,
                      ROW_META=row_meta, INDEXED=True, SCALED=True, INT_X=True, ASM=True, OUT_INT=0))
    ptx = k.asm["ptx"]
    found = {w for w in ("u8", "b16", "f32") if f"ld.global.nc.{w} " in ptx}
    assert found == loads, found


@pytest.mark.parametrize("bits,g,mb,t,block_n,per,indexed,int_x", [
    (2, 16, 4, 1, 16, 16, True, True),  # the decode step's w1/w3 for a 2-bit w2
    (2, 16, 4, 2, 32, 16, False, True),  # two words per program, two tokens
    (3, 64, 4, 1, 16, 16, True, True),  # a 3-bit w2 reads 2-bit-layout activations
    (4, 64, 8, 4, 8, 8, False, True),  # 4-bit: 8 codes per word
    (2, 16, 8, 1, 16, 16, True, False),  # a float-path w1/w3 (a tuned config) before an int w2
])
def test_gated_gemv_writing_int16_activations_compiles_for_sm90(bits, g, mb, t, block_n, per, indexed, int_x):
    """OUT_INT: the gated launch's epilogue quantizes whole words (reshape, permute, split)."""
    from runtime.kernels.triton_gemv import qgemv_kernel

    bt = 1 << max(0, (t - 1).bit_length())
    k = _compile(qgemv_kernel, _gemv_types(bits, mb, "*i32") | {"x_ptr": "*i32" if int_x else "*fp16"},
                 dict(K=4096, MG=128, TILES=8, T=t, BT=bt, BITS=bits, G=g, MB=mb, BLOCK_N=block_n, BLOCK_K=512,
                      X_PERMUTED=not int_x, GATED=True, PARTIAL=False, OUT_PER=1, EVEN=True, ROW_META=True,
                      INDEXED=indexed, SCALED=indexed, INT_X=int_x, ASM=True, OUT_INT=per))
    ptx = k.asm["ptx"]
    assert "st.global" in ptx and ("dp2a.lo.s32.u32" in ptx) == int_x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_xquant_compiles_for_sm90(bits):
    from runtime.kernels.triton_gemv import xquant_kernel

    k = _compile(xquant_kernel, {"x_ptr": "*fp16", "out_ptr": "*i32"}, dict(BITS=bits, BW=64))
    assert "st.global" in k.asm["ptx"]


@pytest.mark.parametrize("act", ["*fp16", "*bf16"])
@pytest.mark.parametrize("partials,experts,fmt", [(0, 0, 1), (1, 8, 0), (4, 8, 2)])
def test_norm_compiles_for_sm90(act, partials, experts, fmt):
    from runtime.kernels.triton_decode import norm_kernel

    types = {"h_ptr": act, "y_ptr": "*fp32" if partials > 1 else act, "hout_ptr": act, "w_ptr": act,
             "out_ptr": act, "r_ptr": act, "idx_ptr": "*i64", "tw_ptr": act, "xf_ptr": "*i32" if fmt == 2 else act,
             "eps": "fp32"}
    k = _compile(norm_kernel, types, dict(P=partials, BH=4096, E=experts, BE=max(experts, 2), TOPK=2 if experts else 0,
                                          BK=2, FMT=fmt, PER=16 if fmt else 1, BW=256 if fmt else 1))
    assert "st.global" in k.asm["ptx"]


@pytest.mark.parametrize("partials", [1, 4])
def test_rotary_compiles_for_sm90(partials):
    from runtime.kernels.triton_decode import rotary_kernel

    types = {"y_ptr": "*fp32" if partials > 1 else "*fp16", "q_ptr": "*fp16", "cache_ptr": "*fp16",
             "cos_ptr": "*fp16", "sin_ptr": "*fp16", "pos_ptr": "*i64"}
    k = _compile(rotary_kernel, types, dict(NQ=32, NK=8, D=128, P=partials))
    assert k.asm["ptx"]


@pytest.mark.parametrize("act", ["*fp16", "*bf16"])
@pytest.mark.parametrize("window,fmt", [(False, 2), (True, 0)])
def test_attend_compiles_for_sm90(act, window, fmt):
    """The split-key attention's two kernels; the split's scores and P.V on the tensor cores."""
    from runtime.kernels.triton_decode import attend_combine_kernel, attend_split_kernel

    types = {"q_ptr": act, "cache_ptr": act, "pos_ptr": "*i64", "ml_ptr": "*fp32", "acc_ptr": "*fp32", "scale": "fp32"}
    k = _compile(attend_split_kernel, types, dict(R=4, RP=16, D=128, G=8, BN=32, WINDOW=window))
    assert "mma" in k.asm["ptx"]
    types = {"ml_ptr": "*fp32", "acc_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": act,
             "xf_ptr": "*i32" if fmt == 2 else act}
    k = _compile(attend_combine_kernel, types, dict(R=4, D=128, G=8, BS=16, WINDOW=window, FMT=fmt, PER=8))
    assert "st.global" in k.asm["ptx"]


def test_every_constexpr_of_the_gemv_is_given():
    """A constexpr left out of a compile above would be compiled as a runtime integer, both
    branches of its `if`s included: the lists must name every one."""
    import inspect

    from runtime.kernels.triton_gemv import qgemv_kernel

    params = inspect.signature(qgemv_kernel.fn).parameters
    constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    given = {"K", "MG", "TILES", "T", "BT", "BITS", "G", "MB", "BLOCK_N", "BLOCK_K", "X_PERMUTED", "GATED", "PARTIAL",
             "OUT_PER", "EVEN", "ROW_META", "INDEXED", "SCALED", "INT_X", "ASM", "OUT_INT"}
    assert constexprs == given


@pytest.mark.parametrize("bits,g,mb", [(2, 16, 8), (3, 64, 8), (4, 64, 16), (8, 40, 8), (2, 16, 4)])
def test_dequant_compiles_for_sm90(bits, g, mb):
    from runtime.kernels.triton_dequant import dequant_kernel

    meta = "*u8" if mb != 16 else "*fp16"
    types = {"out_ptr": "*fp16", "q_ptr": "*u8", "qh_ptr": "*u8", "s_ptr": meta, "z_ptr": meta,
             "sm_ptr": "*fp32", "zm_ptr": "*fp32"}
    k = _compile(dequant_kernel, types, dict(MG=128 if mb != 16 else 1, BITS=bits, G=g, MB=mb, BLOCK_N=16, BLOCK_K=128))
    assert "st.global" in k.asm["ptx"]


@pytest.mark.parametrize("bits,g,mb,even,mats,grouped", [
    (2, 16, 8, True, 1, False), (3, 64, 8, False, 1, False), (4, 64, 16, True, 1, False), (4, 4, 8, False, 1, False),
    (8, 32, 8, True, 1, False), (2, 16, 4, True, 1, False), (4, 4, 4, False, 1, False),
    (2, 16, 4, True, 2, False),  # an expert's w1 and w3 in one launch
    (2, 16, 4, True, 2, True), (3, 64, 8, True, 1, True),  # a layer's experts in one launch
])
def test_dequant_words_compiles_for_sm90(bits, g, mb, even, mats, grouped):
    from runtime.kernels.triton_dequant import dequant_words_kernel

    meta = "*u8" if mb != 16 else "*fp16"
    types = {"out_ptr": "*fp16", "q_ptr": "*i32", "qh_ptr": "*i16", "s_ptr": meta, "z_ptr": meta,
             "sm_ptr": "*fp32", "zm_ptr": "*fp32", "offs_ptr": "*i64"}
    k = _compile(dequant_words_kernel, types, dict(MG=128 if mb != 16 else 1, BITS=bits, G=g, MB=mb, BLOCK_N=16,
                                                   BLOCK_W=32, EVEN=even, MATS=mats, GROUPED=grouped))
    assert "st.global" in k.asm["ptx"]


@pytest.mark.parametrize("bits,g,mb,gated,grouped", [
    (2, 16, 8, False, False), (3, 64, 8, False, False), (4, 64, 16, False, False), (2, 8, 8, False, False),
    (2, 16, 8, True, True), (3, 64, 8, True, True), (2, 16, 8, False, True),  # a layer's experts grouped
    (2, 16, 4, True, True), (3, 64, 4, False, False),
])
def test_qgemm_compiles_for_sm90_with_tensor_cores(bits, g, mb, gated, grouped):
    from runtime.kernels.triton_gemm import qgemm_kernel

    types = _gemv_types(bits, mb, "*fp16") | {"offs_ptr": "*i64"}
    k = _compile(qgemm_kernel, types, dict(MG=128 if mb != 16 else 1, BITS=bits, G=g, MB=mb, BLOCK_M=64, BLOCK_N=64,
                                           BLOCK_K=64, K_TILES=64, GATED=gated, GROUPED=grouped))
    assert "mma" in k.asm["ptx"]  # tl.dot on the tensor cores (mma.sync or wgmma)


@pytest.mark.parametrize("arch", [75, 86, 89], ids=["T4-sm75", "RTX30-sm86", "RTX40-sm89"])
def test_a_decode_steps_kernels_compile_for_consumer_gpus(arch):
    """The tuned table and the timings are the H100's, but the kernels of a decode step (the
    int16-activation GEMVs with dp2a, sm_61 and up; the fused norm and rotary) and the prompt's
    word-wise dequantize must build for the GPUs of the mission's users. The fused GEMM is
    opt-in (MOEPACK_PREFILL=fused): on sm_75 triton lowers its tl.dot without tensor cores."""
    from runtime.kernels.triton_decode import attend_combine_kernel, attend_split_kernel, norm_kernel, rotary_kernel
    from runtime.kernels.triton_dequant import dequant_words_kernel
    from runtime.kernels.triton_gemm import qgemm_kernel
    from runtime.kernels.triton_gemv import qgemv_kernel

    target = GPUTarget("cuda", arch, 32)
    for bits, g, gated, partial in [(2, 16, True, False), (2, 16, False, True), (3, 64, True, False)]:
        k = _compile(qgemv_kernel, _gemv_types(bits, 4, "*fp32" if partial else "*fp16") | {"x_ptr": "*i32"},
                     dict(K=4096, MG=128, TILES=4, T=1, BT=1, BITS=bits, G=g, MB=4, BLOCK_N=16, BLOCK_K=256,
                          X_PERMUTED=False, GATED=gated, PARTIAL=partial, OUT_PER=1, EVEN=True, ROW_META=True,
                          INDEXED=True, SCALED=gated and not partial, INT_X=True, ASM=True, OUT_INT=0), target)
        assert f".target sm_{arch}" in k.asm["ptx"] and "dp2a.lo.s32.u32" in k.asm["ptx"]
    types = {"h_ptr": "*fp16", "y_ptr": "*fp32", "hout_ptr": "*fp16", "w_ptr": "*fp16", "out_ptr": "*fp16",
             "r_ptr": "*fp16", "idx_ptr": "*i64", "tw_ptr": "*fp16", "xf_ptr": "*i32", "eps": "fp32"}
    assert _compile(norm_kernel, types, dict(P=4, BH=4096, E=8, BE=8, TOPK=2, BK=2, FMT=2, PER=16, BW=256), target)
    types = {"y_ptr": "*fp32", "q_ptr": "*fp16", "cache_ptr": "*fp16", "cos_ptr": "*fp16", "sin_ptr": "*fp16",
             "pos_ptr": "*i64"}
    assert _compile(rotary_kernel, types, dict(NQ=32, NK=8, D=128, P=4), target)
    types = {"q_ptr": "*fp16", "cache_ptr": "*fp16", "pos_ptr": "*i64", "ml_ptr": "*fp32", "acc_ptr": "*fp32",
             "scale": "fp32"}
    assert _compile(attend_split_kernel, types, dict(R=4, RP=16, D=128, G=8, BN=32, WINDOW=False), target)
    types = {"ml_ptr": "*fp32", "acc_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": "*fp16", "xf_ptr": "*i32"}
    assert _compile(attend_combine_kernel, types, dict(R=4, D=128, G=8, BS=16, WINDOW=False, FMT=2, PER=8), target)
    types = {"out_ptr": "*fp16", "q_ptr": "*i32", "qh_ptr": "*i16", "s_ptr": "*u8", "z_ptr": "*u8",
             "sm_ptr": "*fp32", "zm_ptr": "*fp32", "offs_ptr": "*i64"}
    assert _compile(dequant_words_kernel, types, dict(MG=128, BITS=2, G=16, MB=4, BLOCK_N=16, BLOCK_W=32, EVEN=True,
                                                      MATS=2, GROUPED=True), target)
    k = _compile(qgemm_kernel, _gemv_types(2, 4, "*fp16") | {"offs_ptr": "*i64"},
                 dict(MG=128, BITS=2, G=16, MB=4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, K_TILES=64, GATED=True,
                      GROUPED=True), target)
    assert arch < 80 or "mma" in k.asm["ptx"]
