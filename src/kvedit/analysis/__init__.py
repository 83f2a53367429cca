"""Analyses of the key-value view (Geva et al. 2021, PMET Fig. 2): trigger examples, value projection,
per-layer statistics, attention vs FFN, one prompt with interventions, and what a patch changed."""

from .components import component_similarity
from .inspect import Intervention, inspect_prompt
from .layers import agreement, corpus_statistics
from .patch_view import changed_memories, patch_report
from .runs import analyze_components, analyze_layers, analyze_triggers, analyze_values
from .topk import RunningTopK
from .triggers import TriggerMiner, TriggerSet, load_or_mine, mine_triggers
from .values import ValueProjection, value_projection, value_projections
from .vocab import logit_lens, project

__all__ = [
    "Intervention",
    "RunningTopK",
    "TriggerMiner",
    "TriggerSet",
    "ValueProjection",
    "agreement",
    "analyze_components",
    "analyze_layers",
    "analyze_triggers",
    "analyze_values",
    "changed_memories",
    "component_similarity",
    "corpus_statistics",
    "inspect_prompt",
    "load_or_mine",
    "logit_lens",
    "mine_triggers",
    "patch_report",
    "project",
    "value_projection",
    "value_projections",
]
