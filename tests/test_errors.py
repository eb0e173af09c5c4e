"""Bad input gets a ValueError or TypeError that names the argument, before any heavy work."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import SMALL_CALL, seeded

from cross_image_attention import InversionResult

CAT = PIL.Image.new("RGB", (80, 64), (200, 120, 40))
DOG = PIL.Image.new("RGB", (64, 64), (40, 120, 200))

BAD_CALLS = [
    ({"appearance_image": CAT.convert("RGBA")}, ValueError, "appearance_image.*RGB.*RGBA"),
    ({"structure_image": DOG.convert("L")}, ValueError, "structure_image.*RGB.*'L'"),
    ({"appearance_image": "cat.png"}, TypeError, "appearance_image"),
    ({"appearance_image": np.full((64, 64, 3), 2.0, dtype=np.float32)}, ValueError, r"appearance_image.*\[0, 1\]"),
    ({"appearance_image": np.zeros((64, 64), dtype=np.uint8)}, ValueError, "appearance_image"),
    ({"structure_image": torch.rand(4, 64, 64)}, ValueError, "structure_image"),
    ({"appearance_image": []}, ValueError, "appearance_image.*empty"),
    ({"appearance_image": [CAT, CAT], "structure_image": [DOG, DOG, DOG]}, ValueError, "equal lengths"),
    ({"appearance_image": None}, ValueError, "appearance_image"),
    ({"height": 100}, ValueError, "height.*multiple of 64"),
    ({"width": 0}, ValueError, "width"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps"),
    ({"skip_steps": 10}, ValueError, "skip_steps"),
    ({"skip_steps": -1}, ValueError, "skip_steps"),
    ({"swap_guidance_scale": -1.0}, ValueError, "swap_guidance_scale"),
    ({"contrast_strength": math.nan}, ValueError, "contrast_strength"),
    ({"inversion_guidance_scale": "3.5"}, TypeError, "inversion_guidance_scale"),
    ({"cross_attn_32_range": (7, 1)}, ValueError, "cross_attn_32_range"),
    ({"cross_attn_64_range": (1,)}, TypeError, "cross_attn_64_range"),
    ({"adain_range": (1.5, 3)}, TypeError, "adain_range"),
    ({"output_type": "jpeg"}, ValueError, "output_type"),
    ({"generator": [seeded(0), seeded(1)]}, ValueError, "generator"),
    ({"generator": 42}, TypeError, "generator"),
    ({"domain_name": None, "use_masked_adain": True}, ValueError, "domain_name"),
    ({"object_noun": "zebra", "use_masked_adain": True}, ValueError, "object_noun.*zebra"),
    ({"appearance_mask": np.ones((8, 8))}, ValueError, "structure_mask"),
    ({"appearance_mask": np.ones((8, 8)), "structure_mask": np.ones((8, 8))}, ValueError, "use_masked_adain"),
    (
        {"appearance_mask": np.ones((2, 8, 8)), "structure_mask": np.ones((8, 8)), "use_masked_adain": True},
        ValueError,
        "appearance_mask",
    ),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ({"prompt": 3}, TypeError, "prompt"),
]


@pytest.mark.parametrize("overrides, error, pattern", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_call_arguments(tiny_pipe, overrides, error, pattern):
    kwargs = {**SMALL_CALL, "appearance_image": CAT, "structure_image": DOG, **overrides}
    with pytest.raises(error, match=pattern):
        tiny_pipe(**kwargs)


@pytest.fixture(scope="module")
def small_inversion(tiny_pipe):
    settings = {k: SMALL_CALL[k] for k in ("num_inference_steps", "skip_steps", "height", "width", "domain_name")}
    return tiny_pipe.invert(CAT, generator=seeded(0), **settings)


def test_inversions_made_with_other_settings_are_refused(tiny_pipe, small_inversion):
    kwargs = {**SMALL_CALL, "structure_image": DOG}
    with pytest.raises(ValueError, match="appearance_inversion.*num_inference_steps"):
        tiny_pipe(appearance_inversion=small_inversion, **{**kwargs, "num_inference_steps": 12})
    with pytest.raises(ValueError, match="appearance_inversion.*height"):
        tiny_pipe(appearance_inversion=small_inversion, **{**kwargs, "height": 128})
    with pytest.raises(ValueError, match="appearance_inversion.*prompt='A photo of a animal'.*'A photo of a cat'"):
        tiny_pipe(appearance_inversion=small_inversion, **{**kwargs, "domain_name": "cat"})
    with pytest.raises(ValueError, match="appearance_inversion.*guidance_scale"):
        tiny_pipe(appearance_inversion=small_inversion, **{**kwargs, "inversion_guidance_scale": 2.0})
    bare = InversionResult(small_inversion.latents, small_inversion.noise, small_inversion.timesteps)
    with pytest.raises(ValueError, match="appearance_inversion.*timesteps"):
        tiny_pipe(appearance_inversion=bare, **{**kwargs, "skip_steps": 4})
    with pytest.raises(ValueError, match="appearance_image.*appearance_inversion.*not both"):
        tiny_pipe(appearance_image=CAT, appearance_inversion=small_inversion, **kwargs)
    with pytest.raises(TypeError, match="appearance_inversion"):
        tiny_pipe(appearance_inversion={"latents": small_inversion.latents}, **kwargs)


def test_bad_invert_arguments(tiny_pipe):
    with pytest.raises(ValueError, match="skip_steps"):
        tiny_pipe.invert(CAT, num_inference_steps=5, skip_steps=5, height=64, width=64)
    with pytest.raises(ValueError, match="image.*RGB"):
        tiny_pipe.invert(CAT.convert("LA"), height=64, width=64)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_pipe.invert(CAT, guidance_scale=math.inf, height=64, width=64)
