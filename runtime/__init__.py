"""tandem.runtime: the Engine (one model: KV cache, prefill/decode, sampling, streaming), Tandem (two models
cooperating on each question) and the `tandem` command."""

from tandem.runtime.engine import Engine, GenerateOutput, Timings
from tandem.runtime.kv_cache import CacheFullError
from tandem.runtime.pipeline import POLICIES, Budget, Prompts, Stage, Tandem, TandemResult
from tandem.runtime.sampling import SamplingParams

__all__ = ["POLICIES", "Budget", "CacheFullError", "Engine", "GenerateOutput", "Prompts", "SamplingParams", "Stage",
           "Tandem", "TandemResult", "Timings"]
