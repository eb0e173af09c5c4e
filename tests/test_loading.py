"""Loading the repository as a diffusers custom pipeline, saving and reloading."""

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline
from tiny_models import SMALL_CALL, seeded

from cross_image_attention import CrossImageAttentionPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]


def transfer(pipe, cat_image, astronaut_image):
    return pipe(cat_image, astronaut_image, **{**SMALL_CALL, "generator": seeded(0), "output_type": "latent"}).images


def test_custom_pipeline_from_repo_root(saved_sd_dir, tiny_pipe, cat_image, astronaut_image):
    pipe = DiffusionPipeline.from_pretrained(
        saved_sd_dir, custom_pipeline=str(REPO_ROOT), trust_remote_code=True, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "CrossImageAttentionPipeline"
    assert type(pipe).__module__.startswith("diffusers_modules")  # the copied module, not the installed package
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the saved PNDM scheduler was converted
    assert torch.equal(transfer(pipe, cat_image, astronaut_image), transfer(tiny_pipe, cat_image, astronaut_image))


def test_from_pipe_reuses_components(saved_sd_dir, cat_image, astronaut_image):
    base = StableDiffusionPipeline.from_pretrained(saved_sd_dir, safety_checker=None)
    pipe = DiffusionPipeline.from_pipe(base, custom_pipeline=str(REPO_ROOT), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "CrossImageAttentionPipeline"
    assert pipe.unet is base.unet
    assert isinstance(base.scheduler, PNDMScheduler)  # the source pipeline is left as it was
    assert torch.isfinite(transfer(pipe, cat_image, astronaut_image)).all()


def test_save_and_reload_round_trip(tiny_pipe, tmp_path, cat_image, astronaut_image):
    tiny_pipe.save_pretrained(tmp_path)
    reloaded = CrossImageAttentionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.safety_checker is None
    assert torch.equal(transfer(reloaded, cat_image, astronaut_image), transfer(tiny_pipe, cat_image, astronaut_image))
