import sys, re, collections
sys.path.insert(0, ".")
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from tools import sass_stats
from runtime.kernels.triton_decode import attend_split_kernel, attend_combine_kernel
def comp(fn, types, cx, ints, nw=4):
    sig = {n: types.get(n, "constexpr" if n in cx else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*") or a in ints}
    return triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
def rep(name, k):
    sass, regs, spill = sass_stats._sass(k, None)
    ins = sass_stats._instructions(sass); body = sass_stats._main_loop(ins) or ins
    mix = collections.Counter(op for _, op, _ in body)
    f = lambda p: sum(v for o, v in mix.items() if o.startswith(p))
    print(name, "regs", regs, "spill", spill, "total", len(ins), "loop", len(body), "BAR", mix.get("BAR", 0), "HMMA", f("HMMA"), "LDS", f("LDS"), "STS", f("STS"), "LDG", f("LDG"), "shared", k.metadata.shared)
for bn in (32, 64):
  for nw in (4, 2):
    k = comp(attend_split_kernel, {"q_ptr": "*fp16", "cache_ptr": "*fp16", "pos_ptr": "*i64", "ml_ptr": "*fp32", "acc_ptr": "*fp32", "scale": "fp32"}, dict(R=4, RP=16, D=128, G=8, BN=bn, WINDOW=False), {"ctx", "KPS"}, nw)
    rep(f"split BN{bn} w{nw}", k)
k = comp(attend_combine_kernel, {"ml_ptr": "*fp32", "acc_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": "*fp16", "xf_ptr": "*i32"}, dict(R=4, D=128, G=8, BS=16, WINDOW=False, FMT=2, PER=8), {"KPS", "S"})
rep("combine", k)
