"""Cross-image attention techniques as diffusers pipelines: Cross-Image Attention (appearance transfer),
Free-Prompt-Editing (text-guided editing) and Visual Style Prompting (SDXL and SD 1.x/2.x)."""

from .ddim_inversion import DDIMInversionResult
from .inputs import load_image
from .inversion import InversionResult
from .pipeline_cross_image import CrossImageAttentionPipeline, CrossImageAttentionPipelineOutput
from .pipeline_prompt_editing import FreePromptEditingPipeline, FreePromptEditingPipelineOutput
from .pipeline_style_prompting import StylePromptingPipeline
from .pipeline_style_prompting_xl import StylePromptingXLPipeline
from .style_prompting import StylePromptingPipelineOutput

__all__ = [
    "CrossImageAttentionPipeline",
    "CrossImageAttentionPipelineOutput",
    "DDIMInversionResult",
    "FreePromptEditingPipeline",
    "FreePromptEditingPipelineOutput",
    "InversionResult",
    "StylePromptingPipeline",
    "StylePromptingPipelineOutput",
    "StylePromptingXLPipeline",
    "load_image",
]
__version__ = "0.1.0"
