"""Sampler cost per token, before (4aa7b26) against now, V=32000, torch's default threads.

    mkdir -p /tmp/oldsamp && git show 4aa7b26:runtime/sampling.py > /tmp/oldsamp/old_sampling.py
    PYTHONPATH=. python docs/results/2026-11-24-dev-cpu/session26/sampler_bench.py /tmp/oldsamp
"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import old_sampling as old
from runtime import sampling as new
V = 32000
torch.manual_seed(0)
hist = torch.randint(0, V, (4096,)).tolist()
def t(f, n=200):
    f(); s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
rows = [("greedy", dict(), 3.0), ("temperature 0.7", dict(temperature=0.7), 3.0),
        ("top-k 40", dict(temperature=0.7, top_k=40), 3.0),
        ("top-p 0.9, peaked logits (std 3)", dict(temperature=0.7, top_p=0.9), 3.0),
        ("top-p 0.9, flat logits (std 1)", dict(temperature=0.7, top_p=0.9), 1.0),
        ("repetition penalty 1.1, greedy, 4096-token context", dict(repetition_penalty=1.1), 3.0),
        ("top-p 0.9, min-p 0.05, penalty 1.1, 4096 tokens", dict(temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.1), 3.0)]
print("| sampler settings | before (us) | after (us) |\n|---|---|---|")
for name, kw, scale in rows:
    logits = torch.randn(V) * scale
    rep = kw.pop("repetition_penalty", None); mp = kw.pop("min_p", None)
    o = old.Sampler(old.SamplingConfig(seed=0, **kw))
    kw.update({"min_p": mp} if mp else {})
    n = new.Sampler(new.SamplingConfig(seed=0, **kw, **({"repetition_penalty": rep} if rep else {})))
    before = "n/a (no option)" if rep else f"{t(lambda: o(logits)):.0f}"
    print(f"| {name} | {before} | {t(lambda: n(logits, hist)):.0f} |")
