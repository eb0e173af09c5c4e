"""Gradio demo: render the structure image's object with the appearance image's look, in the browser.

    python app.py                      # Stable Diffusion 1.5 from the Hub, http://127.0.0.1:7860
    python app.py --model ./my_sd_dir  # any local diffusers Stable Diffusion folder

Two image inputs, the objects' domain name, the pipeline's main options in an "Advanced options" section, the
bundled example pair, a progress bar over the inversion and the denoising steps; the outputs are the transfer and
the reference's strip `[structure | appearance | transfer]` (its first two panels are the pipeline's reconstructions).
Bad inputs are reported as a message in the page. Nothing is fetched from the network but the model (none for a
local `--model`): analytics are off, no share link is made unless `--share` is given.
"""

import argparse
import inspect
import math
import os
import sys
from functools import partial
from pathlib import Path

# Before gradio is imported: no telemetry and no version check against gradio's servers.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from diffusers import EulerDiscreteScheduler  # noqa: E402

from cross_image_attention import (  # noqa: E402
    CrossImageAttentionPipeline,
    FreePromptEditingPipeline,
    StylePromptingPipeline,
)
from cross_image_attention.cli import (  # noqa: E402
    DEFAULT_SEED,
    DEFAULTS,
    EXAMPLE_APPEARANCE,
    EXAMPLE_DOMAIN,
    EXAMPLE_STRUCTURE,
    add_model_options,
    check_device,
    check_model,
    load_pipeline,
    strip_image,
)
from cross_image_attention.cli_edit import run_edit  # noqa: E402
from cross_image_attention.cli_style import run_style  # noqa: E402
from cross_image_attention.style_prompting import PRESETS  # noqa: E402

TITLE = "Cross-Image Attention for Zero-Shot Appearance Transfer"
DESCRIPTION = (
    "Upload an **appearance** image and a **structure** image of similar objects (two animals, two cars, ...) and "
    "name their domain: the output shows the structure image's object with the appearance image's look. The strip "
    "shows the pipeline's reconstructions of the structure and the appearance next to the transfer."
)
# Labels of the number inputs, to name an empty one in the error message.
NUMBER_LABELS = {
    "seed": "Seed",
    "num_timesteps": "Timesteps (num_inference_steps)",
    "skip_steps": "Skipped steps (skip_steps)",
    "swap_guidance_scale": "Appearance guidance (swap_guidance_scale)",
    "contrast_strength": "Attention contrast (contrast_strength)",
    "cross_attn_32_start": "cross_attn_32_range start",
    "cross_attn_32_end": "cross_attn_32_range end",
    "cross_attn_64_start": "cross_attn_64_range start",
    "cross_attn_64_end": "cross_attn_64_range end",
    "adain_start": "adain_range start",
    "adain_end": "adain_range end",
    "height": "Height (pixels)",
    "width": "Width (pixels)",
}


# A public demo serves anyone: these bound one request's work (the pipeline itself accepts more).
MAX_SIDE = 1024
MAX_STEPS = 200
# Uploads are written to Gradio's cache; delete those older than a day, checking every hour.
DELETE_UPLOADS = (3600, 86400)


def message(error: BaseException) -> str:
    """The error's text on one line (some libraries' messages span several)."""
    return " ".join(str(error).split())


def error(text: str) -> gr.Error:
    """A message shown in the page until closed (not for 10 s), without a traceback in the server's log."""
    return gr.Error(text, duration=None, print_exception=False)


def run_transfer(
    pipe: CrossImageAttentionPipeline,
    appearance_image: PIL.Image.Image | None,
    structure_image: PIL.Image.Image | None,
    domain_name: str | None = EXAMPLE_DOMAIN,
    seed: int | None = DEFAULT_SEED,
    num_timesteps: int | None = DEFAULTS["num_inference_steps"],
    skip_steps: int | None = DEFAULTS["skip_steps"],
    swap_guidance_scale: float | None = DEFAULTS["swap_guidance_scale"],
    contrast_strength: float | None = DEFAULTS["contrast_strength"],
    use_masked_adain: bool = DEFAULTS["use_masked_adain"],
    cross_attn_32_start: int | None = DEFAULTS["cross_attn_32_range"][0],
    cross_attn_32_end: int | None = DEFAULTS["cross_attn_32_range"][1],
    cross_attn_64_start: int | None = DEFAULTS["cross_attn_64_range"][0],
    cross_attn_64_end: int | None = DEFAULTS["cross_attn_64_range"][1],
    adain_start: int | None = DEFAULTS["adain_range"][0],
    adain_end: int | None = DEFAULTS["adain_range"][1],
    height: int | None = DEFAULTS["height"],
    width: int | None = DEFAULTS["width"],
    progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (gradio finds the tracker by this default)
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The demo's Run button: the transfer and the strip `[structure | appearance | transfer]`.

    Bad input raises `gr.Error` with a readable one-line message, which Gradio shows in the page.
    """
    if appearance_image is None:
        raise error("Upload an appearance image (the look to transfer).")
    if structure_image is None:
        raise error("Upload a structure image (the object whose shape is kept).")
    numbers = {name: value for name, value in locals().items() if name in NUMBER_LABELS}
    for name, value in numbers.items():
        # An emptied number box arrives as None; the pipeline checks the values themselves.
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise error(f"{NUMBER_LABELS[name]} is empty: enter a number.")
    if not 0 <= seed < 2**64:
        raise error(f"Seed must be an integer from 0 to 2**64 - 1, got {seed}.")
    if num_timesteps > MAX_STEPS:
        raise error(f"{NUMBER_LABELS['num_timesteps']} must be at most {MAX_STEPS} in this demo, got {num_timesteps}.")
    if max(height, width) > MAX_SIDE:
        raise error(f"Height and width must be at most {MAX_SIDE} pixels in this demo, got {height}x{width}.")
    domain_name = (domain_name or "").strip() or None
    if use_masked_adain and domain_name is None:
        raise error(
            "Masked AdaIN needs a domain name (e.g. animal) to find the objects; enter one, or turn masked AdaIN off "
            "in the advanced options."
        )

    # The page's progress bar follows the pipeline's own progress bars (`track_tqdm`): the inversion's steps, then
    # the denoising's. (A `callback_on_step_end` reporting the denoising steps would add nothing: each tqdm update
    # right after it replaces what it reported, and it cannot see the inversion.)
    progress(0, desc="Inverting both images")
    try:
        output = pipe(
            appearance_image.convert("RGB"),
            structure_image.convert("RGB"),
            domain_name=domain_name,
            num_inference_steps=num_timesteps,
            skip_steps=skip_steps,
            swap_guidance_scale=swap_guidance_scale,
            contrast_strength=contrast_strength,
            cross_attn_32_range=(cross_attn_32_start, cross_attn_32_end),
            cross_attn_64_range=(cross_attn_64_start, cross_attn_64_end),
            adain_range=(adain_start, adain_end),
            use_masked_adain=use_masked_adain,
            height=height,
            width=width,
            generator=torch.Generator().manual_seed(int(seed)),
            return_reconstructions=True,
        )
    except (ValueError, TypeError) as problem:
        raise error(message(problem)) from None
    except torch.OutOfMemoryError:
        raise error("Out of memory: try a smaller height and width.") from None
    transfer = output.images[0]
    return transfer, strip_image(output)


def run_prompt_edit(
    pipe: FreePromptEditingPipeline,
    image: PIL.Image.Image | None,
    source_prompt: str,
    prompt: str,
    num_inference_steps: int | None,
    self_replace_steps: float,
    seed: int | None,
) -> PIL.Image.Image:
    """The "Prompt editing" tab: Free-Prompt-Editing of the uploaded image, or of one generated from `seed`."""
    if not (prompt or "").strip():
        raise error("Enter the target prompt (what the image should show).")
    if num_inference_steps is None or seed is None:
        raise error("Steps and seed need a number.")
    if not 1 <= num_inference_steps <= MAX_STEPS:
        raise error(f"Steps must be from 1 to {MAX_STEPS}, got {num_inference_steps}.")
    try:
        return run_edit(
            pipe,
            image.convert("RGB") if image is not None else None,
            prompt,
            source_prompt or "",
            seed=int(seed),
            num_inference_steps=int(num_inference_steps),
            self_replace_steps=float(self_replace_steps),
        )
    except (ValueError, TypeError) as problem:
        raise error(message(problem)) from None


def run_style_prompting(
    pipe: StylePromptingPipeline,
    preset: str,
    target_object: str,
    reference_image: PIL.Image.Image | None,
    reference_prompt: str,
    num_images: int | None,
    num_inference_steps: int | None,
) -> list[PIL.Image.Image]:
    """The "Style prompting" tab: images of `target_object` in a preset's style, or in the style of an uploaded
    reference image described by `reference_prompt`; the reference comes first."""
    if num_images is None or num_inference_steps is None:
        raise error("Images and steps need a number.")
    if not 1 <= num_images <= 8 or not 1 <= num_inference_steps <= MAX_STEPS:
        raise error(f"Images must be from 1 to 8 and steps from 1 to {MAX_STEPS}.")
    options = {"seeds": list(range(int(num_images))), "num_inference_steps": int(num_inference_steps)}
    if reference_image is not None:
        if not (reference_prompt or "").strip():
            raise error("Describe the reference image (its prompt) to use it as the style reference.")
        options.update(prompt=target_object or None, reference_prompt=reference_prompt)
    else:
        options.update(preset=preset, target_object=target_object or None)
    try:
        return run_style(pipe, reference_image.convert("RGB") if reference_image is not None else None, **options)
    except (ValueError, TypeError) as problem:
        raise error(message(problem)) from None


def sister_pipelines(pipe: CrossImageAttentionPipeline) -> tuple[FreePromptEditingPipeline, StylePromptingPipeline]:
    """The editing and style pipelines on the loaded weights (no second copy), with the samplers their authors ran."""
    components = pipe.components
    editing = FreePromptEditingPipeline(**components)
    style = StylePromptingPipeline(
        **{**components, "scheduler": EulerDiscreteScheduler.from_config(components["scheduler"].config)}
    )
    for sister in (editing, style):
        sister.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return editing, style


def build_demo(
    pipe_or_model: CrossImageAttentionPipeline | str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    examples: bool = True,
) -> gr.Blocks:
    """The demo's page around a loaded pipeline, or around a model (Hub id or folder) loaded on `device`.

    `examples` adds the bundled example pair (not cached: selecting it only fills the inputs).
    """
    pipe = pipe_or_model
    if not isinstance(pipe, CrossImageAttentionPipeline):
        pipe = load_pipeline(str(pipe_or_model), device, dtype)

    editing_pipe, style_pipe = sister_pipelines(pipe)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_UPLOADS) as demo:
        with gr.Tab("Appearance transfer", elem_id="tab_transfer"):
            build_transfer_tab(pipe, examples)
        with gr.Tab("Prompt editing", elem_id="tab_edit"):
            build_edit_tab(editing_pipe)
        with gr.Tab("Style prompting", elem_id="tab_style"):
            build_style_tab(style_pipe)
    return demo


def build_transfer_tab(pipe: CrossImageAttentionPipeline, examples: bool) -> None:
    """Cross-Image Attention: two images in, the transfer and the strip out."""
    gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
    with gr.Row():
        with gr.Column():
            with gr.Row():
                appearance = gr.Image(
                    label="Appearance image",
                    type="pil",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    elem_id="appearance",
                )
                structure = gr.Image(
                    label="Structure image",
                    type="pil",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    elem_id="structure",
                )
            domain = gr.Textbox(
                label="Domain name",
                value=EXAMPLE_DOMAIN,
                info='The objects\' class, e.g. "animal" (prompt "A photo of a {domain}")',
                elem_id="domain_name",
            )
            with gr.Accordion("Advanced options", open=False, elem_id="advanced"):
                with gr.Row():
                    seed = gr.Number(label=NUMBER_LABELS["seed"], value=DEFAULT_SEED, precision=0, elem_id="seed")
                    num_timesteps = gr.Number(
                        label=NUMBER_LABELS["num_timesteps"],
                        value=DEFAULTS["num_inference_steps"],
                        precision=0,
                        elem_id="num_timesteps",
                    )
                    skip_steps = gr.Number(
                        label=NUMBER_LABELS["skip_steps"],
                        value=DEFAULTS["skip_steps"],
                        precision=0,
                        info="noisiest steps skipped",
                        elem_id="skip_steps",
                    )
                with gr.Row():
                    swap_guidance_scale = gr.Slider(
                        0,
                        10,
                        value=DEFAULTS["swap_guidance_scale"],
                        step=0.1,
                        label=NUMBER_LABELS["swap_guidance_scale"],
                        elem_id="swap",
                    )
                    contrast_strength = gr.Slider(
                        0,
                        5,
                        value=DEFAULTS["contrast_strength"],
                        step=0.01,
                        label=NUMBER_LABELS["contrast_strength"],
                        elem_id="contrast",
                    )
                use_masked_adain = gr.Checkbox(
                    value=DEFAULTS["use_masked_adain"],
                    label="Masked AdaIN (restrict AdaIN to the objects found by self-segmentation)",
                    elem_id="use_masked_adain",
                )
                ranges = []
                for name in ("cross_attn_32", "cross_attn_64", "adain"):
                    start, end = DEFAULTS[f"{name}_range"]
                    with gr.Row():
                        for side, value in (("start", start), ("end", end)):
                            key = f"{name}_{side}"
                            ranges.append(gr.Number(label=NUMBER_LABELS[key], value=value, precision=0, elem_id=key))
                with gr.Row():
                    height = gr.Number(
                        label=NUMBER_LABELS["height"],
                        value=DEFAULTS["height"],
                        precision=0,
                        step=64,
                        elem_id="height",
                    )
                    width = gr.Number(
                        label=NUMBER_LABELS["width"],
                        value=DEFAULTS["width"],
                        precision=0,
                        step=64,
                        elem_id="width",
                    )
            run = gr.Button("Run", variant="primary", elem_id="run")
        with gr.Column():
            transfer = gr.Image(label="Transfer", type="pil", format="png", interactive=False, elem_id="transfer")
            strip_image = gr.Image(
                label="Strip: structure | appearance | transfer",
                type="pil",
                format="png",
                interactive=False,
                elem_id="strip",
            )
    if examples:
        gr.Examples(
            examples=[[str(EXAMPLE_APPEARANCE), str(EXAMPLE_STRUCTURE), EXAMPLE_DOMAIN]],
            inputs=[appearance, structure, domain],
            label="Example pair (appearance, structure, domain)",
            cache_examples=False,
        )
    run.click(
        partial(run_transfer, pipe),
        inputs=[
            appearance,
            structure,
            domain,
            seed,
            num_timesteps,
            skip_steps,
            swap_guidance_scale,
            contrast_strength,
            use_masked_adain,
            *ranges,
            height,
            width,
        ],
        outputs=[transfer, strip_image],
        api_name="transfer",
        # One run at a time across the tabs: the pipelines share the UNet and swap its attention processors.
        concurrency_limit=1,
        concurrency_id="unet",
    )


def build_edit_tab(pipe: FreePromptEditingPipeline) -> None:
    """Free-Prompt-Editing: an image (or a seed) and two prompts in, the edit out."""
    defaults = {
        name: parameter.default for name, parameter in inspect.signature(type(pipe).__call__).parameters.items()
    }
    gr.Markdown(
        '## Free-Prompt-Editing\nEdit an image by its prompt ("a photo of a cat" to "a photo of a tiger"): its '
        "layout is kept by the source's self-attention maps. Without an image, a generated image of the source "
        "prompt is edited."
    )
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image (optional)", type="pil", image_mode="RGB", elem_id="edit_image")
            source_prompt = gr.Textbox(label="Source prompt", value="", elem_id="edit_source_prompt")
            prompt = gr.Textbox(label="Target prompt", elem_id="edit_prompt")
            with gr.Row():
                steps = gr.Number(label="Steps", value=defaults["num_inference_steps"], precision=0)
                replace = gr.Slider(0, 1, value=defaults["self_replace_steps"], step=0.05, label="Replace steps")
                seed = gr.Number(label="Seed", value=DEFAULT_SEED, precision=0)
            run = gr.Button("Edit", variant="primary", elem_id="edit_run")
        edited = gr.Image(label="Edit", type="pil", format="png", interactive=False, elem_id="edit_output")
    run.click(
        partial(run_prompt_edit, pipe),
        inputs=[image, source_prompt, prompt, steps, replace, seed],
        outputs=[edited],
        api_name="edit",
        concurrency_limit=1,
        concurrency_id="unet",
    )


def build_style_tab(pipe: StylePromptingPipeline) -> None:
    """Visual Style Prompting: a preset (or a reference image and its description) and an object in, images out."""
    gr.Markdown(
        "## Visual Style Prompting\nImages of an object in the style of a reference: a preset's generated "
        "reference, or an uploaded image described by its prompt. The reference is shown first."
    )
    with gr.Row():
        with gr.Column():
            preset = gr.Dropdown(sorted(PRESETS), value="low-poly", label="Preset", elem_id="style_preset")
            target_object = gr.Textbox(label="Object (empty: the preset's)", elem_id="style_object")
            with gr.Accordion("A real image as the reference", open=False):
                reference_image = gr.Image(label="Reference image", type="pil", image_mode="RGB")
                reference_prompt = gr.Textbox(label="Reference prompt (describe the image)")
            with gr.Row():
                num_images = gr.Number(label="Images", value=2, precision=0)
                steps = gr.Number(label="Steps", value=50, precision=0)
            run = gr.Button("Generate", variant="primary", elem_id="style_run")
        gallery = gr.Gallery(label="Reference, then the generated images", elem_id="style_output")
    run.click(
        partial(run_style_prompting, pipe),
        inputs=[preset, target_object, reference_image, reference_prompt, num_images, steps],
        outputs=[gallery],
        api_name="style",
        concurrency_limit=1,
        concurrency_id="unet",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description=f"{TITLE}: Gradio demo.")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument(
        "--share", action="store_true", help="also make a public gradio.live link (needs the network; default: off)"
    )
    parser.add_argument("--no-examples", dest="examples", action="store_false", help="leave out the example pair")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the model and serve the demo until interrupted; 1 with one `error:` line for a bad model or device."""
    args = build_parser().parse_args(argv)
    try:
        check_model(args.model)
        device = check_device(args.device)
        pipe = load_pipeline(args.model, device, args.dtype)
    except (ValueError, TypeError, OSError) as problem:
        print(f"error: {message(problem)}", file=sys.stderr)
        return 1
    demo = build_demo(pipe, examples=args.examples)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
