"""LoRA / IA3 tuning by FFN role (Qiu et al. 2024, Table 2): attention q/v vs FFN keys vs FFN values.

from kvedit.tuning import classification_data, preset, run_tune
data = classification_data(["cb", "boolq", "copa", "qnli"], "../shared/data/tasks", n_train=60, n_test=40)
summary = run_tune(lm, ["attn-qv", "keys", "values"], data, "runs/tune", preset("default"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .adapters import adapter_metadata, load_adapter, merge_adapter, save_adapter
    from .evaluate import Prediction, accuracy_and_f1, predict
    from .instruct import load_alpaca, load_mmlu, macro_accuracy, mmlu_predictions
    from .presets import PRESETS, TrainConfig, preset
    from .runner import TuneData, classification_data, evaluate_adapter, instruct_data, run_tune
    from .targets import TargetSet, adapter_config, attach_adapter, detach_adapter, parse_targets, role_modules
    from .tasks import TASKS, Example, TaskData, TaskDataError, load_task, load_user_task
    from .train import TrainResult, train_adapter

_EXPORTS = {
    "adapter_metadata": ".adapters",
    "load_adapter": ".adapters",
    "merge_adapter": ".adapters",
    "save_adapter": ".adapters",
    "Prediction": ".evaluate",
    "accuracy_and_f1": ".evaluate",
    "predict": ".evaluate",
    "load_alpaca": ".instruct",
    "load_mmlu": ".instruct",
    "macro_accuracy": ".instruct",
    "mmlu_predictions": ".instruct",
    "PRESETS": ".presets",
    "TrainConfig": ".presets",
    "preset": ".presets",
    "TuneData": ".runner",
    "classification_data": ".runner",
    "evaluate_adapter": ".runner",
    "instruct_data": ".runner",
    "run_tune": ".runner",
    "TargetSet": ".targets",
    "adapter_config": ".targets",
    "attach_adapter": ".targets",
    "detach_adapter": ".targets",
    "parse_targets": ".targets",
    "role_modules": ".targets",
    "Example": ".tasks",
    "TASKS": ".tasks",
    "TaskData": ".tasks",
    "TaskDataError": ".tasks",
    "load_task": ".tasks",
    "load_user_task": ".tasks",
    "TrainResult": ".train",
    "train_adapter": ".train",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
