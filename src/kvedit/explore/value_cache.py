"""Every value vector's top tokens, projected once per layer in the background and kept while the weights hold.

The prompt view shows the top tokens of ~10 memories per layer; projecting them through the unembedding is
most of a prompt's cost. `ValueTokenCache` fills `analysis.values.value_projection` for every layer in a
background thread (the page works meanwhile: layers not yet filled are projected on demand), so that once
filled a prompt costs a forward pass and the logit lens. Projections only read weights, so filling runs
beside the quick views; it pauses while weights are being written (edits, reverts, loaded patches), drops any
layer computed while they changed, and `invalidate` drops the layers an edit rewrote.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ..analysis.patch_view import parameter_roles
from ..analysis.values import ValueProjection, value_projection
from ..models.lm import LM


class ValueTokenCache:
    """Per layer, the top `k` token ids of `+v_i` and `-v_i` for every memory i (no final norm)."""

    def __init__(self, lm: LM, k: int) -> None:
        self.lm = lm
        self.k = k
        self._layers: dict[int, ValueProjection] = {}
        self._version = 0
        self._writers = 0
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading ---------------------------------------------------------------------------------
    def get(self, layer: int) -> ValueProjection | None:
        with self._mutex:
            return self._layers.get(layer) if self._writers == 0 else None

    @property
    def ready(self) -> int:
        """How many layers are filled."""
        with self._mutex:
            return len(self._layers)

    # ---- weights changing ------------------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around any change of the weights: nothing cached is used or stored meanwhile."""
        with self._mutex:
            self._writers += 1
            self._version += 1
        try:
            yield
        finally:
            with self._mutex:
                self._writers -= 1
                self._version += 1
            self._wake.set()

    def invalidate(self, names: Iterable[str]) -> None:
        """Drop the layers whose value projections depend on the parameters `names` (their values, or
        anything that is not an FFN key: a post-FFN norm, the unembedding)."""
        names = list(names)
        roles = parameter_roles(self.lm, names)
        prefix = self.lm.arch.layers + "."
        stale: set[int] = set()
        every = False
        for name in names:
            if name in roles:
                layer, role = roles[name]
                if role == "values":
                    stale.add(layer)
            elif name.startswith(prefix):
                stale.add(int(name[len(prefix) :].split(".")[0]))
            else:  # embedding, unembedding, final norm: every layer reads through them
                every = True
                break
        with self._mutex:
            for layer in list(self._layers) if every else stale:
                self._layers.pop(layer, None)
            self._version += 1
        self._wake.set()

    # ---- filling ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Fill the missing layers in a background thread (and again after each invalidation)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="kvedit-value-tokens", daemon=True)
            self._thread.start()

    def fill_now(self) -> None:
        """Fill every missing layer in this thread (scripts and tests)."""
        for layer in range(self.lm.num_layers):
            self._fill_layer(layer)

    def _fill_layer(self, layer: int) -> None:
        with self._mutex:
            if layer in self._layers or self._writers:
                return
            version = self._version
        projection = value_projection(self.lm, layer, self.k)
        with self._mutex:
            if self._version == version and not self._writers:
                self._layers[layer] = projection

    def _fill(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            for layer in range(self.lm.num_layers):
                if self._stop.is_set():
                    return
                self._fill_layer(layer)
            if self.ready == self.lm.num_layers or self._writers:
                self._wake.wait(timeout=5.0)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
