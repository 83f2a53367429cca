"""The explorer's list of applied edits, and reverting any of them without corrupting the others.

Every edit is a `WeightDelta`: whole-tensor before/after copies of the parameters it touched. Reverting an
edit copies its "before" tensors back, so it is only exact when no newer applied edit changed one of those
parameters since; otherwise the copy would silently undo the newer edit too (`WeightDelta.revert` refuses
that case on its own). `EditLog.revert` therefore finds the newer edits in the way (those that touched a
parameter of the edit, or of another edit that has to go) and either refuses, naming them, or — with
`cascade` — reverts them first, newest first, and then the edit. If any step fails, the steps already taken
are re-applied, so the model ends as it started.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from ..editing.delta import WeightDelta
from ..models.lm import LM
from .jobs import NotFound


class RevertConflict(ValueError):
    """Newer applied edits changed the same weights after this one; revert them first (or cascade)."""


@dataclass
class AppliedEdit:
    """One edit in the explorer: its patch, what it was for, and what it did."""

    id: int
    delta: WeightDelta
    label: str
    source: str
    summary: dict[str, Any] = field(default_factory=dict)
    state: str = "applied"
    created: float = field(default_factory=time.time)

    @property
    def names(self) -> set[str]:
        return set(self.delta.names)

    def to_dict(self, detail: bool = False) -> dict[str, Any]:
        meta = self.delta.metadata
        out = {
            "id": self.id,
            "label": self.label,
            "source": self.source,
            "state": self.state,
            "method": meta.get("method"),
            "layers": meta.get("layers"),
            "parameters": sorted(self.names),
            "time_s": (meta.get("result") or {}).get("time_s"),
            "steps": (meta.get("result") or {}).get("steps"),
            "flipped": self.summary.get("flipped"),
        }
        if detail:
            out |= {"summary": self.summary, "requests": meta.get("requests", [])}
        return out


class EditLog:
    """Applied (and reverted) edits in the order they were applied."""

    def __init__(self) -> None:
        self.entries: list[AppliedEdit] = []
        self._ids = itertools.count(1)

    def add(self, delta: WeightDelta, label: str, source: str, summary: dict[str, Any]) -> AppliedEdit:
        entry = AppliedEdit(next(self._ids), delta, label, source, summary)
        self.entries.append(entry)
        return entry

    def get(self, edit_id: int) -> AppliedEdit:
        for entry in self.entries:
            if entry.id == edit_id:
                return entry
        raise NotFound(f"no edit #{edit_id}; edits: {[e.id for e in self.entries] or 'none yet'}")

    def applied(self) -> list[AppliedEdit]:
        return [e for e in self.entries if e.state == "applied"]

    def revert_plan(self, edit_id: int) -> list[AppliedEdit]:
        """The edits to revert, newest first, so that edit `edit_id` can be reverted exactly: itself and
        every newer applied edit that touched a parameter of an edit already in the plan."""
        target = self.get(edit_id)
        if target.state != "applied":
            raise ValueError(f"edit #{edit_id} is already reverted")
        plan, touched = [target], set(target.names)
        for entry in self.applied():
            if entry.id > target.id and entry.names & touched:
                plan.append(entry)
                touched |= entry.names
        return plan[::-1]

    def revert(self, lm: LM, edit_id: int, cascade: bool = False) -> list[int]:
        """Revert edit `edit_id` (with `cascade`, the newer edits in its way first); returns the ids reverted,
        in order. Without `cascade`, newer edits in the way are an error and nothing changes."""
        plan = self.revert_plan(edit_id)
        if len(plan) > 1 and not cascade:
            newer = plan[:-1]
            shared = sorted(self.get(edit_id).names & set().union(*(e.names for e in newer)))
            raise RevertConflict(
                f"edit #{edit_id} cannot be reverted on its own: newer edit(s) "
                f"{', '.join(f'#{e.id} ({e.label})' for e in reversed(newer))} changed weights after it"
                + (f" ({', '.join(shared[:3])}{', …' if len(shared) > 3 else ''})" if shared else "")
                + f", and restoring #{edit_id}'s recorded weights would silently undo them too. Revert "
                f"{', '.join(f'#{e.id}' for e in newer)} first (newest first), or revert them together with it"
            )
        done: list[AppliedEdit] = []
        try:
            for entry in plan:
                entry.delta.revert(lm)
                done.append(entry)
        except Exception:
            for entry in reversed(done):  # put back what was reverted, oldest first
                entry.delta.apply(lm)
            raise
        for entry in done:
            entry.state = "reverted"
        return [e.id for e in done]
