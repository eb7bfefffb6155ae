"""Retrievers: one module per channel (dense FAISS, learned sparse, ColBERT multi-vector, BM25)."""
