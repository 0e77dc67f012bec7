"""tandem.runtime: the Engine (one model: KV cache, prefill/decode, sampling, streaming) and the `tandem` command."""

from tandem.runtime.engine import Engine, GenerateOutput, Timings
from tandem.runtime.kv_cache import CacheFullError
from tandem.runtime.sampling import SamplingParams

__all__ = ["CacheFullError", "Engine", "GenerateOutput", "SamplingParams", "Timings"]
