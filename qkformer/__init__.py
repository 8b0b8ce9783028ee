"""QKFormer: hierarchical spiking transformer with Q-K attention (NeurIPS 2024).

Importing the package registers the variants with timm (``timm.create_model('qkformer_10_384')``).
"""
from . import variants  # noqa: F401  (registers the timm builders)
from .attention import QKChannelAttention, QKTokenAttention, SpikingSelfAttention
from .model import HierarchicalSpikingTransformer
from .neuron import MultiStepLIF
from .variants import VARIANTS, variant_names

__version__ = "0.1.0"
__all__ = ["HierarchicalSpikingTransformer", "MultiStepLIF", "QKTokenAttention",
           "QKChannelAttention", "SpikingSelfAttention", "VARIANTS", "variant_names", "create_model"]


def create_model(name: str, **kwargs):
    """``timm.create_model`` for a QKFormer variant (the package must be imported for timm)."""
    import timm

    return timm.create_model(name, **kwargs)
