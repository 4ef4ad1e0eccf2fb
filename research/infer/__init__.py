"""Inference: prefill and decoding with an explicit KV cache, sampling, loading trained runs.

  from research.infer import Engine, Sampling, pad_prompts, load_run
"""

from research.infer.cache import KVCache
from research.infer.engine import Engine, Generation, Prefill, pad_prompts, stat_mean
from research.infer.load import LoadedRun, load_run, saved_config, with_overrides
from research.infer.sampling import GREEDY, Sampling, draw, sample, top_p_mask

__all__ = ["KVCache", "Engine", "Generation", "Prefill", "pad_prompts", "stat_mean",
           "LoadedRun", "load_run", "saved_config", "with_overrides", "GREEDY", "Sampling",
           "draw", "sample", "top_p_mask"]
