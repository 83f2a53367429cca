"""Official dataset files by name: downloaded once into the cache, then read from disk.

`resolve_dataset("counterfact")` gives the path of `counterfact.json` in `<cache>/datasets/`,
downloading it from the ROME authors' server on first use; any existing path is returned as is.
Downloads go to a temporary file renamed into place only when complete, so an interrupted
download is never mistaken for the file.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tqdm.auto import tqdm

from ..models.cache import cache_dir
from .loaders import DatasetError

DSETS_URL = "https://rome.baulab.info/data/dsets"


@dataclass(frozen=True)
class OfficialDataset:
    """An official file: its name in the cache, URL and format for `load_requests`."""

    filename: str
    url: str
    format: str


OFFICIAL_DATASETS: Mapping[str, OfficialDataset] = MappingProxyType(
    {
        "counterfact": OfficialDataset("counterfact.json", f"{DSETS_URL}/counterfact.json", "counterfact"),
        "multi_counterfact": OfficialDataset(
            "multi_counterfact.json", f"{DSETS_URL}/multi_counterfact.json", "counterfact"
        ),
        "zsre": OfficialDataset("zsre_mend_eval.json", f"{DSETS_URL}/zsre_mend_eval.json", "zsre"),
    }
)


def download(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` with a progress bar; the file appears only once complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and partial.stat().st_size != total:
            raise DatasetError(f"download of {url} ended after {partial.stat().st_size} of {total} bytes")
        os.replace(partial, dest)
    except (urllib.error.URLError, OSError) as e:
        partial.unlink(missing_ok=True)
        raise DatasetError(
            f"cannot download {url} ({e}); download it yourself and pass its path instead of the name"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return dest


#: The reference's consistency resources (`AttributeSnippets`, TF-IDF idf weights and vocabulary).
CONSISTENCY_FILES: Mapping[str, str] = MappingProxyType(
    {name: f"{DSETS_URL}/{name}" for name in ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")}
)


def official_file(filename: str, url: str) -> Path:
    """`<cache>/datasets/<filename>`, downloaded from `url` on first use."""
    path = cache_dir() / "datasets" / filename
    if not path.exists():
        download(url, path)
    return path


def resolve_dataset(name_or_path: str | os.PathLike[str]) -> tuple[Path, str]:
    """(path, format) for an official dataset name or a file path (format "auto" for paths)."""
    key = str(name_or_path)
    if key in OFFICIAL_DATASETS:
        official = OFFICIAL_DATASETS[key]
        return official_file(official.filename, official.url), official.format
    path = Path(key).expanduser()
    if not path.exists():
        raise DatasetError(
            f"dataset {key!r} is neither a file nor an official name; expected a path or one of "
            f"{sorted(OFFICIAL_DATASETS)}"
        )
    return path, "auto"
