"""Entry point for `DiffusionPipeline.from_pretrained(..., custom_pipeline=<this folder>, trust_remote_code=True)`.

diffusers copies only the sibling modules named in relative imports of this file into its module cache, so every
module of the pipeline is imported here explicitly. The sister pipelines (`pipeline_prompt_editing.py`,
`pipeline_style_prompting.py`, `pipeline_style_prompting_xl.py`) load by file path: a loaded file may hold only one
pipeline class.
"""

from .adain import adain, masked_adain  # noqa: F401
from .attention_control import AttentionController, KeyValueInjection, RowGroups  # noqa: F401
from .attention_processors import ControlledAttnProcessor, list_attention_layers  # noqa: F401
from .cross_image_plan import plan_denoising_steps, select_cross_image_layers  # noqa: F401
from .freeu import reference_freeu  # noqa: F401
from .inputs import image_to_pixels  # noqa: F401
from .inversion import InversionResult  # noqa: F401
from .pipeline_cross_image import CrossImageAttentionPipeline, CrossImageAttentionPipelineOutput  # noqa: F401
from .sd_glue import SDGlueMixin  # noqa: F401
from .segmentation import self_segmentation_masks  # noqa: F401
