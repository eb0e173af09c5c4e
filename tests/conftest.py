import os
import tempfile

# Before diffusers is imported: no Hub access, and a private cache for custom-pipeline modules.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="cia-modules-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import build_tiny_components, build_tiny_pipeline, load_input  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_pipe():
    """The fixture's tiny model as a CrossImageAttentionPipeline (shared: tests must not change it)."""
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def cat_image():
    return load_input("chelsea")


@pytest.fixture(scope="session")
def astronaut_image():
    return load_input("astronaut")


@pytest.fixture(scope="session")
def saved_sd_dir(tmp_path_factory):
    """A tiny SD 1.5-like pipeline saved as `StableDiffusionPipeline` with a PNDM scheduler, as on the Hub."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    components = build_tiny_components()
    components["scheduler"] = PNDMScheduler.from_config(components["scheduler"].config, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(path)
    return path
