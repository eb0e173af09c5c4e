"""Cross-Image Attention for Zero-Shot Appearance Transfer, as a diffusers pipeline."""

from .inversion import InversionResult
from .pipeline_cross_image import CrossImageAttentionPipeline, CrossImageAttentionPipelineOutput

__all__ = ["CrossImageAttentionPipeline", "CrossImageAttentionPipelineOutput", "InversionResult"]
__version__ = "0.1.0"
