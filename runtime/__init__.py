"""tandem.runtime: the Engine (one model serving many requests: scheduler, runner, paged KV cache, sampling,
streaming), Tandem (two models cooperating on each question), the `tandem` command."""

from tandem.runtime.config import EngineConfig
from tandem.runtime.engine import Engine
from tandem.runtime.kv_cache import CacheFullError
from tandem.runtime.pipeline import Tandem
from tandem.runtime.stages import POLICIES, Budget, Prompts, Stage, TandemResult
from tandem.runtime.request import (GenerateOutput, Prompt, QueueFullError, RequestAborted, RequestHandle,
                                    Timings)
from tandem.runtime.sampling import SamplingParams

__all__ = ["POLICIES", "Budget", "CacheFullError", "Engine", "EngineConfig", "GenerateOutput", "Prompt", "Prompts",
           "QueueFullError", "RequestAborted", "RequestHandle", "SamplingParams", "Stage", "Tandem", "TandemResult",
           "Timings"]
