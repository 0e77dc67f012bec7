"""Where a checkpoint is: a local folder, or a Hugging Face model id resolved through the hub's cache.

Users of vLLM and transformers name models by id (`Qwen/Qwen3-VL-8B-Instruct`); every entry point that takes a
checkpoint folder (Engine, Tandem, the command line, the server) takes an id too. The id resolves through
huggingface_hub: its cache first, a download (with a progress bar) where the machine has network, the cache only
under HF_HUB_OFFLINE=1. Only the files Tandem reads are fetched: weights, config, tokenizer, templates.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tandem.models.errors import CheckpointError

# What a checkpoint folder holds that Tandem reads; nothing else is downloaded (no .bin or .pth duplicates).
CHECKPOINT_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                    "preprocessor_config.json"]
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """The local folder of a checkpoint given as a folder or a Hugging Face model id ("owner/name").

    A folder that exists wins over an id of the same spelling. CheckpointError, in one line, when it is neither
    a folder nor an id that the cache holds or the hub serves."""
    path = Path(os.fspath(name)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name}: is a file; expected a checkpoint folder (config.json, safetensors, "
                              "tokenizer) or a Hugging Face model id such as Qwen/Qwen3-VL-8B-Instruct")
    text = os.fspath(name)
    if not _MODEL_ID.match(text):
        raise CheckpointError(f"{name}: no such checkpoint folder (a Hugging Face model id looks like owner/name, "
                              "e.g. Qwen/Qwen3-VL-8B-Instruct)")
    return _from_hub(text)


def _from_hub(model_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    try:
        return Path(snapshot_download(model_id, allow_patterns=CHECKPOINT_FILES))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(f"{model_id}: not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
                              f", and it could not be downloaded{offline}: {_first_line(e)}") from e
    except GatedRepoError as e:
        raise CheckpointError(f"{model_id}: the model is gated on the Hugging Face hub; accept its terms and log in "
                              "(hf auth login or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"{model_id}: no such model on the Hugging Face hub (or it is private: log in with "
                              "hf auth login or HF_TOKEN)") from e
    except (OSError, ValueError) as e:  # network failures, disk full, a malformed id the hub refuses
        raise CheckpointError(f"{model_id}: could not be fetched from the Hugging Face hub: {_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
