"""The moe-pack runtime: Mixtral inference from a .moepack file in plain PyTorch.

It reads the format alone (formats/ + torch): never the quantizer, hqq or transformers.
Entry points: runtime.loader.load_model, `python -m runtime.generate`,
`python -m runtime.baseline_bench`. Expert placement is pluggable (runtime.experts.ExpertBackend).
"""
