"""Saved adapters: peft's files plus kvedit's record of targets, settings and data; reload, merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..models.lm import LM
from .presets import TrainConfig
from .targets import TargetSet, quiet_peft

if TYPE_CHECKING:
    from peft import PeftModel


def save_adapter(
    peft_model: PeftModel, folder: Path, targets: TargetSet, config: TrainConfig, lm: LM, manifest: dict[str, Any]
) -> None:
    """peft's adapter files plus the kvedit targets/settings and the data manifest."""
    peft_model.save_pretrained(str(folder))
    meta = {
        "targets": targets.name,
        "roles": list(targets.roles),
        "layers": list(targets.layers),
        "modules": list(targets.modules),
        "train_config": config.to_dict(),
        "model": lm.name,
        "model_fingerprint": lm.base_fingerprint,
    }
    (folder / "kvedit_adapter.json").write_text(json.dumps(meta, indent=1))
    (folder / "data_manifest.json").write_text(json.dumps(manifest, indent=1))


def load_adapter(lm: LM, folder: str | Path) -> PeftModel:
    """A saved adapter on `lm.model` (a peft model; `detach_adapter` removes it)."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} is not a saved adapter (no adapter_config.json)")
    with quiet_peft():
        return PeftModel.from_pretrained(lm.model, folder)


def adapter_metadata(folder: str | Path) -> dict[str, Any]:
    """kvedit's record of a saved adapter (targets, layers, modules, settings, model); {} for a plain peft one."""
    path = Path(folder) / "kvedit_adapter.json"
    return json.loads(path.read_text()) if path.exists() else {}


def merge_adapter(lm: LM, folder: str | Path, out: str | Path) -> Path:
    """Write `lm`'s model with the adapter merged into its weights (and the tokenizer) to `out`; `lm` itself
    holds the merged weights afterwards."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder for the merged model")
    peft_model = load_adapter(lm, folder)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return out
