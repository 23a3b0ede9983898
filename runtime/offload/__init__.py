"""Expert offloading: a GPU expert cache inside a memory budget, fed from a pinned host
arena (or the file itself) by async copies, with speculative prefetch.

budget.py   memory plan and size parsing (pure)
cache.py    LRU cache policies over expert slots (pure)
schedule.py per-layer load/compute schedule and cache statistics (pure)
streams.py  copy stream, events and transfer timing
host.py     pinned host arena and on-demand file reads
engine.py   OffloadedExperts, the ExpertBackend
options.py  CLI options and the load_model backend factory
traces.py   calibrated synthetic routing traces (benchmark)
synthfile.py fast synthetic .moepack files of real shapes (benchmark)
"""

from .budget import MemoryPlan, parse_size, plan_memory
from .cache import ExpertCache, NoCache, make_cache
from .options import OffloadOptions, make_backend_factory, offload_options, preflight
from .schedule import CacheStats, Planner, simulate

__all__ = [
    "CacheStats", "ExpertCache", "MemoryPlan", "NoCache", "OffloadOptions", "Planner", "make_backend_factory",
    "make_cache", "offload_options", "parse_size", "plan_memory", "preflight", "simulate",
]
