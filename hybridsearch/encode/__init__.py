"""Encoding: model resolution, model facts, heads and the encoder itself."""

from .encoder import BGEM3Encoder
from .spec import ModelSpec

__all__ = ["BGEM3Encoder", "ModelSpec"]
