"""Drop-in ``torch.nn`` modules whose hot spots run on fastformer's fused ops."""

from fastformer.nn.encoder import FastTransformerEncoder, FastTransformerEncoderLayer
from fastformer.nn.multihead_attention import FastMultiheadAttention

__all__ = [
    "FastMultiheadAttention",
    "FastTransformerEncoder",
    "FastTransformerEncoderLayer",
]
