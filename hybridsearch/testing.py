"""Tiny random checkpoints in the exact ``BAAI/bge-m3`` file layout, for tests and benchmarks.

Nothing here touches the network: the tokenizer is trained on the spot with ``tokenizers``.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "dense retrieval uses a single vector per text",
    "sparse retrieval scores shared tokens with learned weights",
    "colbert compares every query token with every passage token",
    "bm25 is a classic lexical ranking function from information retrieval",
    "hybrid search fuses several channels into one ranking",
    "vectors are stored in faiss and token matrices are memory mapped",
    "el zorro marrón salta sobre el perro perezoso",
    "le renard brun saute par dessus le chien paresseux",
    "der schnelle braune fuchs springt über den faulen hund",
    "数据检索 混合搜索 向量 稀疏 词元",
]


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A small Unigram tokenizer with XLM-RoBERTa's special tokens, as a fast HF tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator((corpus or DEFAULT_CORPUS) * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return XLMRobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=128,
    )


def make_tiny_m3(path: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2,
                 colbert_dim: int | None = None, max_positions: int = 128,
                 corpus: list[str] | None = None, heads: bool = True) -> Path:
    """Write a random XLM-RoBERTa encoder, its tokenizer and (if ``heads``) both M3 head files.

    Returns the folder. ``colbert_dim`` defaults to ``hidden``, as in bge-m3. ``max_positions``
    is the longest input in tokens; the config gets ``max_positions + 2`` position embeddings
    (RoBERTa's offset), so ``max_positions=8192`` gives bge-m3's 8194 and real 8192-token inputs.
    """
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus)
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=hidden * 2,
        max_position_embeddings=max_positions + 2, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, type_vocab_size=1, initializer_range=0.2,
    )
    model = XLMRobertaModel(config).eval()
    model.save_pretrained(path)
    if heads:
        colbert = torch.nn.Linear(hidden, colbert_dim or hidden)
        sparse = torch.nn.Linear(hidden, 1)
        # A random model's token states share a large common component, so a random sparse head
        # gives every token the same sign. Centre it on the training corpus instead: about three
        # tokens in four get a positive weight, the rest are dropped, as with real checkpoints.
        with torch.no_grad():
            enc = tokenizer(corpus or DEFAULT_CORPUS, padding=True, return_tensors="pt")
            h = model(**enc).last_hidden_state[enc["attention_mask"].bool()]
            z = sparse(h).squeeze(-1) - sparse.bias
            sparse.bias.fill_(-float(torch.quantile(z, 0.25)))
        torch.save(colbert.state_dict(), path / "colbert_linear.pt")
        torch.save(sparse.state_dict(), path / "sparse_linear.pt")
    return path


def make_tiny_reranker(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a random cross-encoder in the ``BAAI/bge-reranker-v2-m3`` layout and its tokenizer.

    The model is an ``XLMRobertaForSequenceClassification`` with ``num_labels=1`` (positions for
    128 tokens); the tokenizer is :func:`train_tokenizer`'s. Offline. Returns the folder.
    """
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=130,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
        initializer_range=0.2, num_labels=1,
    )
    model = XLMRobertaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    return path


def legacy_bm25_index(path: str | Path) -> Path:
    """Turn a new, empty index folder (``HybridIndex.create(..., bm25=True)``, nothing added)
    into the layout hybridsearch wrote before BM25 postings (format version 2): BM25 in a
    tantivy folder ``bm25-000000``. Tests of old indexes start from it."""
    import json

    from .index import locking
    from .index import storage as st
    from .retrievers.bm25 import BM25Index

    path = Path(path)
    m = json.loads((path / st.MANIFEST).read_text())
    if m["segments"] or not m["channels"]["bm25"]:
        raise ValueError("legacy_bm25_index needs a new, empty index with BM25")
    m["channels"].pop("bm25_store", None)
    m["format_version"] = 2
    m["bm25"] = "bm25-000000"
    BM25Index.create(path / m["bm25"]).close()
    locking.write_lease(path, m)
    st.write_json_durable(path / st.MANIFEST, m)
    st.fsync_dir(path)
    return path
