"""Shared fixtures: tiny random checkpoints in the bge-m3 layout, built once per test session."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_m3(tmp_path_factory):
    """Folder of a random XLM-RoBERTa encoder with both BGE-M3 head files (colbert dim 24)."""
    from hybridsearch.testing import make_tiny_m3

    return make_tiny_m3(tmp_path_factory.mktemp("tiny_m3"), seed=0, colbert_dim=24)


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    """Folder of a random encoder without M3 heads, mean pooling declared in 1_Pooling/."""
    from hybridsearch.testing import make_tiny_m3

    path = make_tiny_m3(tmp_path_factory.mktemp("tiny_dense"), seed=1, heads=False)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
                    "pooling_mode_mean_tokens": True})
    )
    return path


@pytest.fixture(scope="session")
def m3_encoder(tiny_m3):
    from hybridsearch import BGEM3Encoder

    return BGEM3Encoder(tiny_m3, device="cpu")
