"""Cross-Image Attention for Zero-Shot Appearance Transfer, as a diffusers pipeline."""

from .inputs import load_image
from .inversion import InversionResult
from .pipeline_cross_image import CrossImageAttentionPipeline, CrossImageAttentionPipelineOutput

__all__ = ["CrossImageAttentionPipeline", "CrossImageAttentionPipelineOutput", "InversionResult", "load_image"]
__version__ = "0.1.0"
