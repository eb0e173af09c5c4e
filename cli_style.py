"""`cross-image-attention style ...`: Visual Style Prompting from the command line, with the authors' presets.

    cross-image-attention style --preset low-poly                       # SD 1.5, the preset's prompts and seeds
    cross-image-attention style --preset fire --object "A tiger" --sdxl # SDXL base, another object
    cross-image-attention style --prompt "a cat" --reference_image "The starry night.png"   # a real reference
    cross-image-attention style --list_presets

writes to `--output_path` the reference (`reference.png`), one image per seed (`seed_<s>.png`), the authors' grid
`[reference | generated...]` (`grid.png`) and the run's settings (`config.json`). Every check runs before the model
loads; bad input ends the command with one `error:` line and exit status 1. Pipeline defaults are read from the
pipeline's signature, never restated here. [`run_style`] is what the Gradio demo calls.
"""

import argparse
import inspect
import json
import sys
from pathlib import Path
from types import MappingProxyType

import PIL.Image
import torch
from diffusers import ControlNetModel

from .cli import DEFAULT_MODEL, add_model_options, check_device, check_model, read_image, torch_dtype, write_config
from .pipeline_style_prompting import StylePromptingPipeline
from .pipeline_style_prompting_xl import StylePromptingXLPipeline
from .style_prompting import PRESETS, REAL_IMAGE_TEMPLATES

PROG = "cross-image-attention style"
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_SEEDS = (0,)
DEFAULT_REFERENCE_SEED = 42
GRID_PADDING = 10  # pixels of white between the grid's images, as the authors' grids
# The pipeline arguments the command passes through when given (their defaults are the pipeline's).
PIPELINE_OPTIONS = (
    "num_inference_steps",
    "guidance_scale",
    "early_guidance_scale",
    "early_guidance_steps",
    "style_layers",
    "style_steps",
    "color_calibration",
    "height",
    "width",
    "controlnet_conditioning_scale",
)
PIPELINE_DEFAULTS = MappingProxyType(
    {
        name: parameter.default
        for name, parameter in inspect.signature(StylePromptingXLPipeline.__call__).parameters.items()
        if name in PIPELINE_OPTIONS
    }
)


def style_prompts(
    preset: str | None = None,
    prompt: str | None = None,
    target_object: str | None = None,
    reference_prompt: str | None = None,
    reference_object: str | None = None,
    negative_prompt: str | None = None,
    reference_image_name: str | None = None,
    seeds=None,
    reference_seed: int | None = None,
    sdxl: bool = False,
) -> dict:
    """The pipeline's prompts, negative prompt, seeds and style layers from a preset and the user's overrides.

    Args:
        preset: A name of `PRESETS`: its template fills the prompts, its negative prompt, seeds and layers apply.
        prompt, reference_prompt: Whole prompts, overriding the preset's template.
        target_object, reference_object: The objects put into the preset's template.
        negative_prompt: Overrides the preset's negative prompt (for every row).
        reference_image_name: The real reference's file name: the authors' real-image script has prompts for its
            paintings by name (e.g. ``"The starry night"``), used when no `reference_prompt` is given.
        seeds, reference_seed: Override the preset's (defaults without a preset: 0 and 42).
        sdxl: The preset's style layers for SDXL rather than SD 1.x/2.x.
    """
    resolved = {"seeds": list(seeds) if seeds is not None else None, "reference_seed": reference_seed}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {preset!r}; one of {sorted(PRESETS)}")
        if reference_image_name is not None:
            raise ValueError("--preset makes its reference from a prompt; leave it out with --reference_image")
        style = PRESETS[preset]
        prompt = prompt or style.prompt(target_object or style.target_object)
        reference_prompt = reference_prompt or style.prompt(reference_object or style.reference_object)
        negative_prompt = style.negative_prompt if negative_prompt is None else negative_prompt
        resolved["seeds"] = resolved["seeds"] or list(style.seeds)
        resolved["reference_seed"] = style.reference_seed if reference_seed is None else reference_seed
        if style.style_layers(sdxl) is not None:
            resolved["style_layers"] = style.style_layers(sdxl)
    elif reference_image_name is not None and reference_prompt is None:
        template = REAL_IMAGE_TEMPLATES.get(reference_image_name.split(".")[0])
        if template is None:
            raise ValueError(
                "--reference_prompt is required with --reference_image: describe the image (the authors caption it "
                f"with BLIP-2); prompts are known only for {sorted(REAL_IMAGE_TEMPLATES)}"
            )
        reference_prompt = template.replace("{prompt}", reference_image_name.split(".")[0])
        prompt = prompt or template.replace("{prompt}", target_object or "cat")
    prompt = prompt or target_object
    if prompt is None or reference_prompt is None:
        raise ValueError("pass --preset NAME, or --prompt (or --object) and --reference_prompt")
    resolved["seeds"] = resolved["seeds"] or list(DEFAULT_SEEDS)
    if resolved["reference_seed"] is None:
        resolved["reference_seed"] = DEFAULT_REFERENCE_SEED
    if any(not 0 <= seed < 2**64 for seed in [*resolved["seeds"], resolved["reference_seed"]]):
        raise ValueError("--seeds and --reference_seed must be integers from 0 to 2**64 - 1")
    return {**resolved, "prompt": prompt, "reference_prompt": reference_prompt, "negative_prompt": negative_prompt}


def run_style(
    pipe: StylePromptingPipeline | StylePromptingXLPipeline,
    reference_image: PIL.Image.Image | None = None,
    control_image: PIL.Image.Image | None = None,
    **options,
) -> list[PIL.Image.Image]:
    """Images `[reference, generated...]` for a preset and overrides (see [`style_prompts`]) and pipeline options.

    The options of `PIPELINE_OPTIONS` that are given go to the pipeline as they are (None included, e.g.
    ``early_guidance_scale=None`` turns the early guidance off); leave one out for the pipeline's default. One CPU
    generator per seed draws each image's initial latent (as the authors' scripts, so results match across devices);
    `reference_seed` seeds the reference's latent, or the real-image flow's re-noising.
    """
    pipeline_options = {name: options.pop(name) for name in PIPELINE_OPTIONS if name in options}
    resolved = style_prompts(**options, sdxl=isinstance(pipe, StylePromptingXLPipeline))
    if "style_layers" in resolved and "style_layers" not in pipeline_options:
        pipeline_options["style_layers"] = resolved["style_layers"]
    output = pipe(
        prompt=resolved["prompt"],
        reference_prompt=resolved["reference_prompt"],
        reference_image=reference_image,
        negative_prompt=resolved["negative_prompt"],
        num_images_per_prompt=len(resolved["seeds"]),
        generator=[torch.Generator().manual_seed(seed) for seed in resolved["seeds"]],
        reference_generator=torch.Generator().manual_seed(resolved["reference_seed"]),
        control_image=control_image,
        **pipeline_options,
    )
    return [*output.reference_images, *output.images]


def grid_image(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """The images side by side on white, `GRID_PADDING` pixels apart."""
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (len(images) * (width + GRID_PADDING) - GRID_PADDING, height), (255, 255, 255))
    for index, image in enumerate(images):
        grid.paste(image, (index * (width + GRID_PADDING), 0))
    return grid


def parse_pair(text: str) -> tuple[int, int]:
    """`START,END` (argparse type)."""
    try:
        start, end = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END integers, got {text!r}") from None
    return start, end


def parse_style_layers(text: str) -> int | list[str]:
    """An int, or comma-separated processor names (argparse type)."""
    return int(text) if text.strip().isdigit() else [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    defaults = PIPELINE_DEFAULTS
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Visual Style Prompting: generate images in the style of a reference made from a prompt (or a "
        "real image), with the authors' presets.",
    )
    parser.add_argument("--list_presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--object", dest="target_object", help="the generated images' object in the preset's template")
    parser.add_argument("--reference_object", help="the reference's object in the preset's template")
    parser.add_argument("--prompt", help="the generated images' whole prompt (overrides the preset's template)")
    parser.add_argument(
        "--reference_prompt", help="the reference's whole prompt, or a description of --reference_image"
    )
    parser.add_argument("--negative_prompt", help="negative prompt for every row (default: the preset's, else none)")
    parser.add_argument("--reference_image", type=Path, help="a real reference image (the real-image flow)")
    parser.add_argument("--seeds", type=int, nargs="+", help="one image per seed (default: the preset's, else 0)")
    parser.add_argument("--reference_seed", type=int, help="the reference's seed (default: the preset's, else 42)")
    parser.add_argument(
        "--num_inference_steps", type=int, help=f"denoising steps (default: {defaults['num_inference_steps']})"
    )
    parser.add_argument("--guidance_scale", type=float, help=f"default: {defaults['guidance_scale']}")
    parser.add_argument(
        "--early_guidance_scale",
        type=float,
        help="guidance of the first steps (default: 20 from a prompt, off with a real or control image)",
    )
    parser.add_argument("--no_early_guidance", action="store_true", help="turn the early guidance off")
    parser.add_argument("--early_guidance_steps", type=int, help=f"default: {defaults['early_guidance_steps']}")
    parser.add_argument(
        "--style_layers",
        type=parse_style_layers,
        help="the last K decoder self-attention layers, or comma-separated processor names (default: the "
        "decoder's highest-resolution level, or the preset's)",
    )
    parser.add_argument(
        "--style_steps",
        type=parse_pair,
        action="append",
        metavar="START,END",
        help="half-open window of steps with swapping; repeatable (default: every step)",
    )
    parser.add_argument(
        "--color_calibration",
        type=parse_pair,
        metavar="START,END",
        help="colour calibration for START > t > END with --reference_image (default: 150,100)",
    )
    parser.add_argument("--no_color_calibration", action="store_true", help="turn colour calibration off")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--controlnet", help="ControlNet Hub id or folder; needs --control_image")
    parser.add_argument("--control_image", type=Path, help="the ControlNet's input image (edges, depth, ...)")
    parser.add_argument(
        "--controlnet_conditioning_scale",
        type=float,
        help=f"default: {defaults['controlnet_conditioning_scale']}",
    )
    parser.add_argument(
        "--sdxl",
        action="store_true",
        help=f"SDXL (default model {SDXL_MODEL}) instead of SD 1.x/2.x (default model {DEFAULT_MODEL}); a local "
        "SDXL folder is recognised without it",
    )
    add_model_options(parser)
    parser.set_defaults(model=None)  # resolved by --sdxl
    parser.add_argument("--output_path", type=Path, default=Path("output"), help="output folder (default: output)")
    return parser


def is_sdxl(model: str, flag: bool) -> bool:
    """`--sdxl`, or a local pipeline folder with SDXL's second text encoder."""
    index = Path(model) / "model_index.json"
    return flag or (index.is_file() and "text_encoder_2" in json.loads(index.read_text()))


def check_numbers(args: argparse.Namespace) -> None:
    """Reject bad values before the model loads, naming the flag (sizes: the pipeline checks the multiple)."""
    for flag, minimum in (("num_inference_steps", 1), ("early_guidance_steps", 0), ("height", 1), ("width", 1)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise ValueError(f"--{flag} must be at least {minimum}, got {value}")
    for flag in ("guidance_scale", "early_guidance_scale", "controlnet_conditioning_scale"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value < float("inf"):
            raise ValueError(f"--{flag} must be a finite number >= 0, got {value}")
    for start, end in args.style_steps or ():
        if not 0 <= start <= end:
            raise ValueError(f"--style_steps must be START,END with 0 <= START <= END, got {start},{end}")
    if args.color_calibration is not None:
        if args.reference_image is None:
            raise ValueError("--color_calibration needs --reference_image")
        if args.color_calibration[0] <= args.color_calibration[1]:
            raise ValueError(f"--color_calibration must be START,END with START > END, got {args.color_calibration}")
    if isinstance(args.style_layers, int) and args.style_layers < 0:
        raise ValueError(f"--style_layers must be >= 0, got {args.style_layers}")
    if (args.controlnet is None) != (args.control_image is None):
        raise ValueError("--controlnet and --control_image go together")


def load_style_pipeline(model: str, sdxl: bool, device, dtype: str, controlnet: str | None = None):
    """The model as a Visual Style Prompting pipeline (no safety checker), in the dtype, on the device."""
    components = {}
    if controlnet is not None:
        components["controlnet"] = ControlNetModel.from_pretrained(controlnet, dtype=torch_dtype(dtype))
    if sdxl:
        pipe = StylePromptingXLPipeline.from_pretrained(model, dtype=torch_dtype(dtype), **components)
    else:
        pipe = StylePromptingPipeline.from_pretrained(
            model,
            dtype=torch_dtype(dtype),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **components,
        )
    return pipe.to(device)


def run(args: argparse.Namespace) -> list[Path]:
    """Check everything, load the model, generate, and write the images, the grid and the settings."""
    check_numbers(args)
    options = {
        "preset": args.preset,
        "prompt": args.prompt,
        "target_object": args.target_object,
        "reference_prompt": args.reference_prompt,
        "reference_object": args.reference_object,
        "negative_prompt": args.negative_prompt,
        "reference_image_name": args.reference_image.name if args.reference_image else None,
        "seeds": args.seeds,
        "reference_seed": args.reference_seed,
    }
    sdxl = args.sdxl
    model = args.model or (SDXL_MODEL if sdxl else DEFAULT_MODEL)
    check_model(model)
    sdxl = is_sdxl(model, sdxl)
    resolved = style_prompts(**options, sdxl=sdxl)  # checks the prompts before the model loads
    device = check_device(args.device)
    reference_image = read_image(args.reference_image, "--reference_image")[1] if args.reference_image else None
    control_image = read_image(args.control_image, "--control_image")[1] if args.control_image else None
    pipeline_options = {name: getattr(args, name) for name in PIPELINE_OPTIONS if getattr(args, name) is not None}
    if args.no_early_guidance:
        pipeline_options["early_guidance_scale"] = None
    if args.no_color_calibration:
        pipeline_options["color_calibration"] = None
    args.output_path.mkdir(parents=True, exist_ok=True)

    pipe = load_style_pipeline(model, sdxl, device, args.dtype, args.controlnet)
    images = run_style(pipe, reference_image, control_image, **options, **pipeline_options)
    paths = [args.output_path / "reference.png"]
    paths += [args.output_path / f"seed_{seed}.png" for seed in resolved["seeds"]]
    for path, image in zip(paths, images):
        image.save(path)
    grid_image(images).save(args.output_path / "grid.png")
    write_config(args.output_path / "config.json", args, {"model": model, "sdxl": sdxl, **resolved})
    return [*paths, args.output_path / "grid.png"]


def main(argv: list[str] | None = None) -> int:
    """Run `cross-image-attention style`; returns the exit code (1 with one `error:` line for bad input)."""
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, preset in PRESETS.items():
            target, reference = preset.prompt(preset.target_object), preset.prompt(preset.reference_object)
            print(f"{name}: {target!r} in the style of {reference!r}")
        return 0
    try:
        paths = run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"Saved {', '.join(str(path) for path in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
