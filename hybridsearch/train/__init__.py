"""Training: BGE-M3 style embedder fine-tuning, RetroMAE pretraining, reranker fine-tuning,
hard-negative mining and the JSONL data they read.

Import the submodules directly (``hybridsearch.train.embedder``, ``.reranker``, ``.pretrain``,
``.mining``, ``.data``, ``.losses``, ``.cli``); this package imports nothing on its own.
"""
