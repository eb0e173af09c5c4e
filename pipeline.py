"""Entry point for `DiffusionPipeline.from_pretrained(..., custom_pipeline=<this folder>, trust_remote_code=True)`.

diffusers copies only the sibling modules named in relative imports of this file into its module cache, so every
module of the pipeline is imported here explicitly.
"""

from .adain import adain, masked_adain  # noqa: F401
from .attention_processors import CrossImageAttnProcessor, select_cross_image_layers  # noqa: F401
from .freeu import reference_freeu  # noqa: F401
from .inversion import InversionResult  # noqa: F401
from .pipeline_cross_image import CrossImageAttentionPipeline, CrossImageAttentionPipelineOutput  # noqa: F401
from .segmentation import self_segmentation_masks  # noqa: F401
