"""`cross-image-attention edit`: Free-Prompt-Editing of an image file, or of a generated image, from the command line.

    cross-image-attention edit --image cat.jpg --source_prompt "a photo of a cat" --prompt "a photo of a tiger"
    cross-image-attention edit --source_prompt "green ducks on a street" --prompt "rubber ducks on a street"

writes the edit (`edited.png`), with `--save_source` the source branch (`source.png`: the reconstruction, or the
generated source image), and the run's settings (`config.json`) to `--output_path`. `--save_inversion FILE` keeps the
image's inversion; `--inversion FILE` edits from it instead of `--image`. Defaults are the pipeline's.
"""

import argparse
import inspect
import math
import sys
from pathlib import Path

import PIL.Image
import torch

from .cli import (
    add_model_options,
    check_device,
    check_model,
    load_pipeline,
    read_image,
    write_atomically,
    write_config,
)
from .ddim_inversion import DDIMInversionResult
from .pipeline_prompt_editing import FreePromptEditingPipeline

CALL_DEFAULTS = {
    name: p.default for name, p in inspect.signature(FreePromptEditingPipeline.__call__).parameters.items()
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that a bad flag is one `error:` line and exit code 1 as well."""

    def error(self, message):
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cross-image-attention edit",
        description="Free-Prompt-Editing: edit an image by its prompt (real image with --image or --inversion; "
        "without either, a generated image of --source_prompt is edited).",
    )
    parser.add_argument("--image", type=Path, help="the image to edit")
    parser.add_argument("--inversion", type=Path, help="an inversion saved with --save_inversion, instead of --image")
    parser.add_argument("--save_inversion", type=Path, help="write the image's inversion to this file")
    parser.add_argument("--prompt", required=True, help="the target prompt, e.g. 'a photo of a tiger'")
    default = CALL_DEFAULTS
    parser.add_argument(
        "--source_prompt", default=default["source_prompt"], help="prompt of the source image (default: '')"
    )
    parser.add_argument("--negative_prompt", help="unconditional text of the edit (default: '')")
    parser.add_argument("--output_path", type=Path, default=Path("output"), help="output folder (default: output)")
    for flag, kind in (("num_inference_steps", int), ("guidance_scale", float), ("self_replace_max_tokens", int)):
        parser.add_argument(f"--{flag}", type=kind, default=default[flag], help=f"(default: {default[flag]})")
    parser.add_argument(
        "--inversion_guidance_scale", type=float, help="guidance scale of the inversion (default: --guidance_scale)"
    )
    parser.add_argument(
        "--self_replace_steps",
        type=float,
        nargs="+",
        default=[default["self_replace_steps"]],
        metavar="FRACTION",
        help="fraction F of the steps (0 <= i < int(T F)) whose self-attention maps are replaced, or START END "
        f"fractions (default: {default['self_replace_steps']})",
    )
    parser.add_argument(
        "--resize_mode",
        choices=("crop", "stretch"),
        default=default["resize_mode"],
        help="centre crop + bicubic resize, or the reference's nearest-neighbour stretch (default: crop)",
    )
    parser.add_argument("--null_text", action="store_true", help="null-text inversion (slower; better reconstruction)")
    parser.add_argument("--seed", type=int, default=42, help="seed of a generated image (default: 42)")
    parser.add_argument("--save_source", action="store_true", help="also write the source branch as source.png")
    parser.add_argument("--height", type=int, help="image height in pixels (default: 512, or the inversion's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: 512, or the inversion's)")
    add_model_options(parser)
    return parser


def check_settings(args: argparse.Namespace) -> None:
    """Reject bad values before the model is loaded, naming the flag.

    Args:
        args: The parsed command line.
    """
    if args.image is not None and args.inversion is not None:
        raise ValueError("pass --image or --inversion, not both")
    if args.save_inversion is not None and args.image is None:
        raise ValueError("--save_inversion needs --image")
    if args.null_text and args.image is None:
        raise ValueError("--null_text needs --image")
    if args.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
    for flag in ("guidance_scale", "inversion_guidance_scale"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{flag} must be a finite number >= 0, got {value}")
    fractions = args.self_replace_steps
    if len(fractions) > 2 or not all(0 <= f <= 1 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"--self_replace_steps must be F or START END with 0 <= START <= END <= 1, got {fractions}")
    if args.self_replace_max_tokens < 0:
        raise ValueError(f"--self_replace_max_tokens must be >= 0, got {args.self_replace_max_tokens}")
    for flag in ("height", "width"):  # the multiple the sides need depends on the model; the pipeline checks it
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")


def load_edit_pipeline(model: str, device: str | torch.device, dtype: str) -> FreePromptEditingPipeline:
    """The model as a `FreePromptEditingPipeline` (its scheduler becomes DDIM), in the dtype, on the device.

    Args:
        model: A Hub id or a local diffusers pipeline folder.
        device: The torch device.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
    """
    return load_pipeline(model, device, dtype, FreePromptEditingPipeline)


def run_edit(
    pipe: FreePromptEditingPipeline,
    image: PIL.Image.Image | None,
    prompt: str,
    source_prompt: str = "",
    seed: int | None = None,
    **options,
) -> PIL.Image.Image:
    """One edit as a PIL image, for the demo: of `image`, or without it of a generated image drawn with `seed`.

    Args:
        options: Further keyword arguments of the pipeline call (`num_inference_steps`, `self_replace_steps`, ...).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    output = pipe(prompt, image, source_prompt=source_prompt, generator=generator, output_type="pil", **options)
    return output.images[0]


def run(args: argparse.Namespace) -> None:
    """Check the inputs, load the model, edit, and write the outputs."""
    check_settings(args)
    device = check_device(args.device)
    image = read_image(args.image, "--image")[1] if args.image is not None else None
    inversion = None
    if args.inversion is not None:
        if not args.inversion.is_file():
            raise ValueError(f"--inversion: no such file: {args.inversion}")
        inversion = DDIMInversionResult.load(args.inversion)
    check_model(args.model)
    args.output_path.mkdir(parents=True, exist_ok=True)
    pipe = load_edit_pipeline(args.model, device, args.dtype)
    settings = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "inversion_guidance_scale": args.inversion_guidance_scale,
        "height": args.height,
        "width": args.width,
        "resize_mode": args.resize_mode,
    }
    if image is not None and (args.null_text or args.save_inversion is not None):
        print("Inverting the image")
        size = {side: getattr(args, side) for side in ("height", "width") if getattr(args, side) is not None}
        scale = args.guidance_scale if args.inversion_guidance_scale is None else args.inversion_guidance_scale
        inversion = pipe.invert(
            image,
            prompt=args.source_prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=scale,
            resize_mode=args.resize_mode,
            null_text=args.null_text,
            **size,
        )
        image = None
        if args.save_inversion is not None:
            write_atomically(args.save_inversion, inversion.save)
    print("Editing")
    fractions = args.self_replace_steps
    output = pipe(
        args.prompt,
        image,
        source_prompt=args.source_prompt,
        inversion=inversion,
        negative_prompt=args.negative_prompt,
        self_replace_steps=fractions[0] if len(fractions) == 1 else tuple(fractions),
        self_replace_max_tokens=args.self_replace_max_tokens,
        generator=torch.Generator().manual_seed(args.seed),
        return_source=args.save_source,
        **settings,
    )
    edited = args.output_path / "edited.png"
    output.images[0].save(edited)
    if args.save_source:
        output.source_images[0].save(args.output_path / "source.png")
    write_config(args.output_path / "config.json", args, {"flow": "generated" if output.inversion is None else "real"})
    print(f"Saved {edited}")


def main(argv: list[str] | None = None) -> int:
    """Run `cross-image-attention edit`; returns the exit code (1 with one `error:` line on stderr for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(build_parser().parse_args(argv))
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0
