"""SafeTokenizer: the same ids as the Hugging Face tokenizer's own truncation, with no shared state."""

import threading

import pytest

from hybridsearch.encode.tokenize import SafeTokenizer
from hybridsearch.testing import DEFAULT_CORPUS, train_tokenizer

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
TEXTS = [
    "", "fox", "dense retrieval uses a single vector per text", LONG,
    "数据检索 混合搜索 Ω€ unknown chars", "  spaces  around ", "<s> literal specials </s>", "a<mask>b",
]
LENGTHS = [2, 3, 5, 8, 50, 128, 1000]


def bert_style_tokenizer():
    """A WordPiece tokenizer with the [CLS] ... [SEP] template, as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(DEFAULT_CORPUS * 4, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module", params=["xlm-r", "bert"])
def hf_tokenizer(request):
    return train_tokenizer() if request.param == "xlm-r" else bert_style_tokenizer()


@pytest.mark.parametrize("side", ["right", "left"])
def test_same_ids_as_hf_truncation(hf_tokenizer, side):
    tok = hf_tokenizer
    tok.truncation_side = side
    try:
        safe = SafeTokenizer(tok)
        assert safe.n_special == 2 and len(tok(LONG)["input_ids"]) > 128  # texts longer than the cut
        for ml in LENGTHS:
            assert safe.encode(TEXTS, ml) == tok(TEXTS, truncation=True, max_length=ml)["input_ids"], ml
            assert safe.encode_plain(TEXTS, ml) == tok(TEXTS, add_special_tokens=False, truncation=True,
                                                       max_length=ml)["input_ids"], ml
        assert safe.ids(TEXTS) == tok(TEXTS)["input_ids"]
    finally:
        tok.truncation_side = "right"


def test_fallback_under_lock_same_ids(hf_tokenizer):
    """The path for tokenizers whose template is not a fixed prefix and suffix."""
    safe = SafeTokenizer(hf_tokenizer)
    safe._exact = False
    for ml in LENGTHS[1:]:
        assert safe.encode(TEXTS, ml) == hf_tokenizer(TEXTS, truncation=True, max_length=ml)["input_ids"]
    assert safe.encode_plain(TEXTS, 5) == hf_tokenizer(TEXTS, add_special_tokens=False, truncation=True,
                                                       max_length=5)["input_ids"]


def test_too_short_max_length(hf_tokenizer):
    with pytest.raises(ValueError, match="special tokens"):
        SafeTokenizer(hf_tokenizer).encode(["fox"], 1)


@pytest.mark.parametrize("exact", [True, False])
def test_threads_with_different_lengths(exact):
    """Threads cutting at different lengths, and someone else truncating the shared tokenizer."""
    tok = train_tokenizer()
    safe = SafeTokenizer(tok)
    safe._exact = exact
    mid = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)  # about 120 tokens
    texts = [mid + f" {i}" for i in range(4)] + TEXTS[:3]
    want = {ml: tok(texts, truncation=True, max_length=ml)["input_ids"] for ml in (6, 100)}
    want_plain = tok(texts, add_special_tokens=False, truncation=True, max_length=9)["input_ids"]
    start, errors = threading.Barrier(5), []

    def worker(ml):
        start.wait()
        for _ in range(100):
            if ml == "plain":
                got_ok = safe.encode_plain(texts, 9) == want_plain
            else:
                got_ok = safe.encode(texts, ml) == want[ml]
            if not got_ok:
                errors.append(ml)

    def other_user():  # mutates the shared HF tokenizer's truncation setting
        start.wait()
        for i in range(200):
            tok(texts[:2], truncation=True, max_length=3 + i % 5)

    threads = [threading.Thread(target=worker, args=(ml,)) for ml in (6, 100, 100, "plain")]
    threads.append(threading.Thread(target=other_user))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
