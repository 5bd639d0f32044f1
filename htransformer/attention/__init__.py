"""Attention: hierarchical (H-Transformer-1D) and the full-attention baseline."""

from htransformer.attention.api import cudnn_padded_length
from htransformer.attention.api import full_attention
from htransformer.attention.api import hierarchical_attention
from htransformer.attention.hierarchical import num_levels
from htransformer.attention.hierarchical import padded_length

__all__ = ["hierarchical_attention", "full_attention", "padded_length",
           "num_levels", "cudnn_padded_length"]
