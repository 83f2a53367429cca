"""Write a model folder (weights + tokenizer) safely: never into kvedit's cache, never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .cache import cache_dir, is_inside_cache
from .ffn_width import config_width, uniform_state_dict
from .lm import LM


def check_output_folder(out: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that is a file, a non-empty folder, or inside kvedit's cache.

    Call it before any work, so bad input fails at once.
    """
    out = Path(out).expanduser()
    if is_inside_cache(out):
        raise ValueError(
            f"--out {out} is inside kvedit's cache ({cache_dir()}); writing there would replace "
            "the cached model every later run loads. Choose a folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder that is not empty; choose a new folder (nothing was written)")
    return out


def save_model_folder(lm: LM, out: str | os.PathLike[str]) -> Path:
    """Save `lm`'s weights and tokenizer to `out`, which appears only once complete.

    Written into a temporary folder beside `out` and renamed, so an interruption or a full disk
    leaves no partial model behind.
    """
    out = check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state, width = uniform_state_dict(lm)  # layers that grew memories: the others padded with inert ones
        config, attr = lm.model.config, lm.arch.ffn_width_attr
        stated, changed = getattr(config, attr, None), width != config_width(lm)
        if changed:  # the config states the width every saved layer has
            setattr(config, attr, width)
        try:
            lm.model.save_pretrained(staging, state_dict=state)
        finally:
            if changed:
                setattr(config, attr, stated)
        lm.tokenizer.save_pretrained(staging)
        if out.is_dir():
            out.rmdir()  # empty, as checked
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
