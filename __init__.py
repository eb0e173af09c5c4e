"""Cross-image attention techniques as diffusers pipelines: Cross-Image Attention (appearance transfer),
Free-Prompt-Editing (text-guided editing) and Visual Style Prompting (SDXL and SD 1.x/2.x).

The names below are imported on first use (PEP 562), so that `cross-image-attention --help` and other light uses of
the package do not import torch, diffusers and transformers.
"""

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "CrossImageAttentionPipeline": "pipeline_cross_image",
    "CrossImageAttentionPipelineOutput": "pipeline_cross_image",
    "DDIMInversionResult": "ddim_inversion",
    "FreePromptEditingPipeline": "pipeline_prompt_editing",
    "FreePromptEditingPipelineOutput": "pipeline_prompt_editing",
    "InversionResult": "inversion",
    "StylePromptingPipeline": "pipeline_style_prompting",
    "StylePromptingPipelineOutput": "style_prompting",
    "StylePromptingXLPipeline": "pipeline_style_prompting_xl",
    "load_image": "inputs",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *_EXPORTS]
