"""Command line interface: appearance transfer between two image files, with the reference's `run.py` options.

    cross-image-attention --app_image_path zebra.png --struct_image_path giraffe.png --domain_name animal

writes to `--output_path` the transfer (`transfer.png`), the strip `[structure | appearance | transfer]` of the
reference (`strip.png`, its first two panels are the pipeline's reconstructions) and the run's settings
(`config.json`). Without image paths the bundled example pair in `examples/` is used.

Inversions are cached as safetensors files named by a hash of the image file's bytes and of every setting that
changes the inversion, never by file name; `--load_latents` reuses them.
"""

from __future__ import annotations  # annotations name torch and PIL types, imported only where used

import argparse
import ast
import hashlib
import importlib
import io
import json
import os
import platform
import re
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from .inversion import InversionResult
    from .pipeline_cross_image import CrossImageAttentionPipeline

# torch, diffusers, transformers and the pipeline are imported inside the functions that use them: parsing the command
# line (and `--help`) needs none of them, and they take seconds to import.

EXAMPLES = Path(__file__).parent / "examples"
# The bundled pair (sources and licences in examples/LICENSE.md): a raccoon's look on Chelsea the cat.
EXAMPLE_APPEARANCE = EXAMPLES / "raccoon.jpg"
EXAMPLE_STRUCTURE = EXAMPLES / "chelsea.jpg"
EXAMPLE_DOMAIN = "animal"

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def torch_dtype(name: str):
    """The torch dtype of a `--dtype` name."""
    import torch

    return getattr(torch, name)


def signature_defaults(module_file: Path, class_name: str, method: str = "__call__") -> dict:
    """The literal defaults of ``class_name.method``, read from the module's source without importing it (so that
    the command line's `--help` needs no torch). `tests/test_cli.py` checks they equal the imported signature's."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    function = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == method)
    arguments = function.args
    positional = arguments.args[len(arguments.args) - len(arguments.defaults) :]
    pairs = [*zip(positional, arguments.defaults), *zip(arguments.kwonlyargs, arguments.kw_defaults)]
    return {argument.arg: ast.literal_eval(default) for argument, default in pairs if default is not None}


# Every default is the pipeline's (the reference's values); nothing is restated here.
DEFAULTS = signature_defaults(Path(__file__).parent / "pipeline_cross_image.py", "CrossImageAttentionPipeline")
# The reference inverts with this classifier-free guidance scale; it is a constant there, not an option.
INVERSION_GUIDANCE_SCALE = DEFAULTS["inversion_guidance_scale"]
# The reference's seed (its `RunConfig` default); the pipeline itself has none.
DEFAULT_SEED = 42
# The pipeline's argument names that the command line spells differently.
FLAGS = {"num_inference_steps": "--num_timesteps"}
# torch.Generator seeds are unsigned 64-bit integers.
MAX_SEED = 2**64 - 1
# A `.partial` cache file older than this is a leftover of a killed run (writing one takes about a second).
PARTIAL_MAX_AGE_S = 600
# A Hub repository id, "name" or "namespace/name"; anything else that does not exist locally is a missing folder.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
ROLES = ("appearance", "structure")


def parse_bool(text: str) -> bool:
    """An argparse type for `--flag true/false` (the reference's pyrallis style)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class UsageError(ValueError):
    """A malformed command line; reported like every other bad input."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are the command's other errors: one `error:` line naming the flag, exit 1
    (argparse's own prints the whole usage and exits 2). `--help` is unchanged."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device` and `--dtype`, shared by the command line and the demo."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="model dtype (default: float32)")


def build_parser() -> argparse.ArgumentParser:
    """The options of the reference's `RunConfig`, plus model, device, dtype, size and cache folder."""
    parser = OneLineParser(
        prog="cross-image-attention",
        description="Cross-Image Attention for Zero-Shot Appearance Transfer: render the structure image's object "
        "with the appearance image's look. Without image paths, the bundled example pair is used.",
    )
    parser.add_argument("--app_image_path", type=Path, help="image whose appearance is transferred")
    parser.add_argument("--struct_image_path", type=Path, help="image whose structure is kept")
    parser.add_argument(
        "--domain_name", help='the objects\' class, e.g. "animal" (needed by masked AdaIN; default prompt)'
    )
    parser.add_argument("--prompt", help='the prompt (default: "A photo of a {domain_name}")')
    parser.add_argument("--object_noun", help="word of the prompt naming the object (default: the domain name)")
    parser.add_argument("--output_path", type=Path, default=Path("output"), help="output folder (default: output)")
    parser.add_argument("--cache_dir", type=Path, help="inversion cache folder (default: OUTPUT_PATH/inversions)")
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"random seed of the inversions (default: {DEFAULT_SEED})"
    )
    for flag, kind, what in (
        ("--num_timesteps", int, "length of the DDIM schedule"),
        ("--skip_steps", int, "noisiest steps skipped"),
        ("--swap_guidance_scale", float, "appearance guidance"),
        ("--contrast_strength", float, "contrast of the attention maps in cross-image attention"),
    ):
        default = DEFAULTS[flag_argument(flag)]
        parser.add_argument(flag, type=kind, default=default, help=f"{what} (default: {default})")
    parser.add_argument(
        "--use_masked_adain",
        type=parse_bool,
        nargs="?",
        const=True,
        default=DEFAULTS["use_masked_adain"],
        metavar="BOOL",
        help=f"restrict AdaIN to the objects found by self-segmentation (default: {DEFAULTS['use_masked_adain']})",
    )
    parser.add_argument(
        "--no-use_masked_adain", dest="use_masked_adain", action="store_false", help="same as --use_masked_adain false"
    )
    parser.add_argument(
        "--load_latents",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="reuse cached inversions of the same image bytes and settings (default: invert and overwrite)",
    )
    for flag, what in (
        ("--cross_attn_32_range", "cross-image attention in the decoder's second level (32x32 tokens at 512 px)"),
        ("--cross_attn_64_range", "cross-image attention in the decoder's highest level (64x64 tokens at 512 px)"),
        ("--adain_range", "AdaIN"),
    ):
        start, end = DEFAULTS[flag_argument(flag)]
        parser.add_argument(
            flag,
            type=int,
            nargs=2,
            default=(start, end),
            metavar=("START", "END"),
            help=f"denoising steps with {what} (default: {start} {end})",
        )
    add_model_options(parser)
    for side in ("height", "width"):
        default = DEFAULTS[side]
        parser.add_argument(
            f"--{side}", type=int, default=default, help=f"image {side} in pixels (default: {default})"
        )
    return parser


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path, str | None]:
    """The appearance and structure paths and the domain name: the bundled pair when no path is given."""
    if args.app_image_path is None and args.struct_image_path is None:
        return EXAMPLE_APPEARANCE, EXAMPLE_STRUCTURE, args.domain_name or EXAMPLE_DOMAIN
    if args.app_image_path is None or args.struct_image_path is None:
        raise ValueError("pass both --app_image_path and --struct_image_path, or neither to run the bundled example")
    return args.app_image_path, args.struct_image_path, args.domain_name


def flag_argument(flag: str) -> str:
    """The pipeline argument a flag sets (`--num_timesteps` -> `num_inference_steps`)."""
    name = flag.lstrip("-")
    return next((argument for argument, spelled in FLAGS.items() if spelled == flag), name)


def in_flag_words(error: Exception) -> ValueError:
    """The pipeline's error about an argument, naming the flag instead (`num_inference_steps` -> --num_timesteps)."""
    text = re.sub(r"`(\w+)`", lambda match: FLAGS.get(match.group(1), f"--{match.group(1)}"), str(error))
    return ValueError(text)


def check_settings(args: argparse.Namespace, domain_name: str | None) -> None:
    """Reject bad values before the model is loaded, with the pipeline's own checks, naming the flag."""
    from .pipeline_cross_image import check_steps, check_transfer_settings

    try:
        check_steps(args.num_timesteps, args.skip_steps)
        check_transfer_settings(
            swap_guidance_scale=args.swap_guidance_scale,
            contrast_strength=args.contrast_strength,
            inversion_guidance_scale=INVERSION_GUIDANCE_SCALE,
            cross_attn_32_range=tuple(args.cross_attn_32_range),
            cross_attn_64_range=tuple(args.cross_attn_64_range),
            adain_range=tuple(args.adain_range),
        )
    except (ValueError, TypeError) as error:
        raise in_flag_words(error) from None
    # Positive here; the multiple the sides need depends on the model ([`check_model_settings`]).
    for flag in ("height", "width"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**64 - 1], got {args.seed}")
    if args.use_masked_adain and domain_name is None:
        raise ValueError(
            "--use_masked_adain needs --domain_name to find the objects; or pass --use_masked_adain false"
        )


def check_device(name: str | None) -> torch.device:
    """The torch device (None: cuda if available, else cpu); an unknown name, a missing CUDA or a device that holds
    no data (`meta`) is an error rather than a traceback later."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    if device.type == "meta":
        raise ValueError(f"--device {name}: the meta device holds no data; use cpu or a GPU")
    try:  # e.g. a backend torch was not built with, or a GPU index that does not exist
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(f"--device {name}: {' '.join(str(error).split()[:30])}") from None
    return device


def check_output_folder(path: Path, flag: str) -> None:
    """The folder exists or can be made: no file in the way (the error names the flag, not an errno)."""
    for existing in (path, *path.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise ValueError(f"{flag}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {existing} is not writable")


def not_cached_error(model: str) -> ValueError:
    """The one line for a Hub model that is neither in the local cache nor downloadable now."""
    return ValueError(
        f"--model: {model} is not in the local Hugging Face cache and could not be downloaded; download it once "
        f"online (`hf download {model}`), or pass --model a local copy of the pipeline folder"
    )


def read_model_configs(model: str) -> dict:
    """The scheduler's, UNet's and VAE's configs (small JSON files; no weights are loaded).

    Raises:
        ValueError: naming `--model`, when the model is not available.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    configs = {}
    for part, kind in (("scheduler", DDIMScheduler), ("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' arguments
                warnings.simplefilter("ignore", UserWarning)
                configs[part] = kind.load_config(model, subfolder=part)
        except OSError as error:
            if not Path(model).is_dir():
                raise not_cached_error(model) from None
            raise ValueError(f"--model: cannot read {part}/config.json of {model}: {error}") from None
    return configs


def check_model_settings(args: argparse.Namespace, domain_name: str | None) -> None:
    """The checks that depend on the model, from its configs and tokenizer only, before its weights are loaded:
    the size multiple, the schedule length and, for masked AdaIN, the object noun in the prompt."""
    import transformers

    from .inputs import check_size
    from .pipeline_cross_image import (
        CrossImageAttentionPipeline,
        check_schedule_length,
        needs_segmentation,
        object_noun_positions,
    )
    from .sd_glue import size_multiple_of, vae_scale_factor_of

    configs = read_model_configs(args.model)
    try:
        multiple = size_multiple_of(vae_scale_factor_of(configs["vae"]), configs["unet"])
        check_size(args.height, args.width, multiple)
        check_schedule_length(args.num_timesteps, configs["scheduler"]["num_train_timesteps"])
        num_steps = args.num_timesteps - args.skip_steps
        if needs_segmentation(args.use_masked_adain, False, tuple(args.adain_range), num_steps):
            try:
                tokenizer = transformers.CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
            except OSError:
                if not Path(args.model).is_dir():
                    raise not_cached_error(args.model) from None
                raise ValueError(f"--model: cannot read the tokenizer of {args.model}") from None
            prompt = CrossImageAttentionPipeline.default_prompts(args.prompt, domain_name, 1)
            noun = args.object_noun if args.object_noun is not None else domain_name
            object_noun_positions(tokenizer, prompt, [noun])
    except (ValueError, TypeError) as error:
        raise in_flag_words(error) from None


def check_model(model: str) -> None:
    """A local model must be a diffusers pipeline folder; other names must look like a Hub id."""
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--model: not a diffusers pipeline folder (no model_index.json): {model}")
    elif path.exists():
        raise ValueError(f"--model: not a folder: {model}")
    elif not HUB_ID.fullmatch(model):
        raise ValueError(f"--model: no such folder: {model}")


def read_image(path: Path, flag: str) -> tuple[bytes, PIL.Image.Image]:
    """The file's bytes (for the cache key) and the RGB image decoded from those same bytes by
    [`~inputs.load_image`] (EXIF orientation applied, 16-bit and grayscale files converted)."""
    from .inputs import load_image

    if not path.exists():
        raise ValueError(f"{flag}: no such file: {path}")
    if not path.is_file():
        raise ValueError(f"{flag}: not a file: {path}")
    data = path.read_bytes()
    try:
        image = load_image(io.BytesIO(data))
    except ValueError as error:
        raise ValueError(f"{flag}: {error}: {path}") from None
    return data, image


def inversion_settings(args: argparse.Namespace, prompt: str) -> dict:
    """Everything besides the image that determines its inversion, for the cache key."""
    model = Path(args.model)
    return {
        "prompt": prompt,
        "num_timesteps": args.num_timesteps,
        "skip_steps": args.skip_steps,
        "guidance_scale": INVERSION_GUIDANCE_SCALE,
        "height": args.height,
        "width": args.width,
        "model": str(model.resolve()) if model.exists() else args.model,
        "dtype": args.dtype,
        "seed": args.seed,
        "version": __version__,
    }


def cache_key(image_bytes: bytes, role: str, settings: dict) -> str:
    """sha256 of the image bytes, the role and the settings.

    The role is part of the key because both images draw their noise from one generator, appearance first: the
    same file inverted as the structure gets other noise than as the appearance.
    """
    payload = {"image_sha256": hashlib.sha256(image_bytes).hexdigest(), "role": role, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_pipeline(model: str, device: str | torch.device, dtype: str, pipeline_class=None):
    """The model as a `CrossImageAttentionPipeline` (its scheduler becomes DDIM), or as ``pipeline_class`` (another
    SD 1.x/2.x pipeline of this project), without the safety checker, in the dtype, on the device."""
    if pipeline_class is None:
        from .pipeline_cross_image import CrossImageAttentionPipeline as pipeline_class

    pipe = pipeline_class.from_pretrained(
        model,
        dtype=torch_dtype(dtype),  # diffusers >= 0.40 name; `torch_dtype` is deprecated
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file of a unique name, then rename it to `path`.

    Readers never see a partial file, and processes writing the same cache entry at once do not write into each
    other's file: the last rename wins, with equal content. The file gets the user's normal mode (0666 less the
    umask, as `open` gives), not `mkstemp`'s 0600: the README suggests a cache folder shared between users.
    """
    partial = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.partial")
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        # The mode `open` gave (0666 less the umask); writers that replace the file (safetensors) make it 0600.
        mode = os.stat(partial).st_mode & 0o777
        write(partial)
        os.chmod(partial, mode)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


def invert_and_cache(
    pipe: CrossImageAttentionPipeline,
    image: PIL.Image.Image,
    generator: torch.Generator,
    path: Path,
    args: argparse.Namespace,
    prompt: str,
) -> InversionResult:
    """Invert one image with the command's settings and write it to the cache file `path`."""
    inversion = pipe.invert(
        image,
        prompt=prompt,
        num_inference_steps=args.num_timesteps,
        skip_steps=args.skip_steps,
        guidance_scale=INVERSION_GUIDANCE_SCALE,
        height=args.height,
        width=args.width,
        generator=generator,
    )
    write_atomically(path, inversion.save)
    return inversion


def remove_stale_partials(folder: Path) -> None:
    """Delete `.partial` files that killed runs left behind; recent ones may be another process's write."""
    now = time.time()
    for partial in folder.glob(".*.partial"):
        try:
            if now - partial.stat().st_mtime > PARTIAL_MAX_AGE_S:
                partial.unlink()
        except OSError:  # removed meanwhile by its writer, or not ours to remove
            pass


def load_cached(path: Path, role: str) -> InversionResult | None:
    """The cached inversion, or None after reporting a corrupt or truncated file (it is then recomputed)."""
    from .inversion import InversionResult

    try:
        inversion = InversionResult.load(path)
    except ValueError as error:
        print(f"warning: ignoring the unreadable cached {role} inversion ({' '.join(str(error).split())}); "
              "inverting again", file=sys.stderr)  # fmt: skip
        return None
    print(f"Loading the cached {role} inversion {path}")
    return inversion


def invert_or_load(
    pipe: CrossImageAttentionPipeline,
    images: list[PIL.Image.Image],
    cache_paths: list[Path],
    reuse: bool,
    args: argparse.Namespace,
    prompt: str,
) -> tuple[InversionResult, InversionResult]:
    """The appearance and structure inversions, loaded from the cache files (when `reuse`) or computed and cached.

    Both images draw their noise from one generator, appearance first, as in the reference. A structure inverted
    after a cached appearance therefore first skips the appearance's draws, so its noise equals an uncached run's.
    """
    import torch

    from .inversion import skip_trajectory_draws

    (app_image, struct_image), (app_path, struct_path) = images, cache_paths
    remove_stale_partials(app_path.parent)
    generator = torch.Generator().manual_seed(args.seed)
    appearance = load_cached(app_path, "appearance") if reuse and app_path.is_file() else None
    structure = load_cached(struct_path, "structure") if reuse and struct_path.is_file() else None
    if appearance is not None:
        if structure is None:
            skip_trajectory_draws(args.num_timesteps, tuple(appearance.latents.shape[1:]), generator)
    else:
        print("Inverting the appearance image")
        appearance = invert_and_cache(pipe, app_image, generator, app_path, args, prompt)
    if structure is None:
        print("Inverting the structure image")
        structure = invert_and_cache(pipe, struct_image, generator, struct_path, args, prompt)
    return appearance, structure


def transfer(
    pipe: CrossImageAttentionPipeline,
    app_inversion: InversionResult,
    struct_inversion: InversionResult,
    args: argparse.Namespace,
    domain_name: str,
    prompt: str,
):
    """The pipeline's output for the inverted pair, with the reconstructions that the strip shows."""
    print("Running the appearance transfer")
    return pipe(
        appearance_inversion=app_inversion,
        structure_inversion=struct_inversion,
        domain_name=domain_name,
        prompt=prompt,
        object_noun=args.object_noun,
        num_inference_steps=args.num_timesteps,
        skip_steps=args.skip_steps,
        swap_guidance_scale=args.swap_guidance_scale,
        contrast_strength=args.contrast_strength,
        cross_attn_32_range=args.cross_attn_32_range,
        cross_attn_64_range=args.cross_attn_64_range,
        adain_range=args.adain_range,
        use_masked_adain=args.use_masked_adain,
        inversion_guidance_scale=INVERSION_GUIDANCE_SCALE,
        height=args.height,
        width=args.width,
        return_reconstructions=True,
    )


def strip_image(output) -> PIL.Image.Image:
    """The reference's strip `[structure | appearance | transfer]` of the first pair (the first two panels are the
    pipeline's reconstructions)."""
    import numpy as np
    import PIL.Image

    panels = [output.structure_reconstructions[0], output.appearance_reconstructions[0], output.images[0]]
    return PIL.Image.fromarray(np.concatenate([np.asarray(panel) for panel in panels], axis=1))


def save_outputs(output, folder: Path) -> tuple[Path, Path]:
    """`transfer.png` and the reference's strip `[structure | appearance | transfer]` as `strip.png`."""
    transfer_path, strip_path = folder / "transfer.png", folder / "strip.png"
    write_atomically(transfer_path, lambda path: output.images[0].save(path, format="PNG"))
    write_atomically(strip_path, lambda path: strip_image(output).save(path, format="PNG"))
    return transfer_path, strip_path


def write_config(path: Path, args: argparse.Namespace, resolved: dict) -> None:
    """Every option (with the defaults filled in) and the library versions, as JSON."""
    import diffusers
    import torch
    import transformers

    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    config.update(resolved)
    config["versions"] = {
        "cross_image_attention": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    write_atomically(path, lambda partial: Path(partial).write_text(json.dumps(config, indent=2) + "\n"))


def transfer_pair(
    pipe: CrossImageAttentionPipeline,
    args: argparse.Namespace,
    paths: tuple[Path, Path],
    images: tuple[tuple[bytes, PIL.Image.Image], tuple[bytes, PIL.Image.Image]],
    domain_name: str | None,
    cache_dir: Path,
    reuse: bool,
    extra_config: dict | None = None,
) -> tuple[Path, Path]:
    """Invert (or load) one pair, transfer it, and write `transfer.png`, `strip.png` and `config.json` to
    `args.output_path`; shared by the single-pair command and `batch`, so that both give the same results and caches.

    Args:
        paths: The appearance and structure files (recorded in the config).
        images: `(file bytes, RGB image)` of the appearance and the structure, as [`read_image`] returns them.
        reuse: Load inversions that are already in `cache_dir` (else invert and overwrite them).
        extra_config: More entries for `config.json`.
    """
    from .pipeline_cross_image import CrossImageAttentionPipeline

    (app_bytes, app_image), (struct_bytes, struct_image) = images
    prompt = CrossImageAttentionPipeline.default_prompts(args.prompt, domain_name, 1)[0]
    settings = inversion_settings(args, prompt)
    cache_paths = [
        cache_dir / f"{cache_key(data, role, settings)}.safetensors"
        for data, role in zip((app_bytes, struct_bytes), ROLES)
    ]
    app_inversion, struct_inversion = invert_or_load(pipe, [app_image, struct_image], cache_paths, reuse, args, prompt)
    output = transfer(pipe, app_inversion, struct_inversion, args, domain_name, prompt)
    saved = save_outputs(output, args.output_path)
    write_config(
        args.output_path / "config.json",
        args,
        {
            "app_image_path": str(paths[0]),
            "struct_image_path": str(paths[1]),
            "domain_name": domain_name,
            "prompt": prompt,
            "inversion_guidance_scale": INVERSION_GUIDANCE_SCALE,
            "inversions": {role: str(path) for role, path in zip(ROLES, cache_paths)},
            **(extra_config or {}),
        },
    )
    return saved


@contextmanager
def output_folders(*folders: Path) -> Iterator[None]:
    """Make the folders; on failure remove again those this made that are still empty (no empty output folders
    are left behind by a failed run)."""
    made = []
    for folder in folders:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        made.extend(missing)
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first, as listed
            try:
                folder.rmdir()
            except OSError:  # not empty (kept) or already gone
                pass
        raise


def run(args: argparse.Namespace) -> None:
    """Check every input before any model is loaded, then invert (or load) both images, transfer, and write the
    outputs."""
    app_path, struct_path, domain_name = resolve_inputs(args)
    check_settings(args, domain_name)
    cache_dir = args.cache_dir if args.cache_dir is not None else args.output_path / "inversions"
    check_output_folder(args.output_path, "--output_path")
    check_output_folder(cache_dir, "--cache_dir" if args.cache_dir is not None else "--output_path")
    device = check_device(args.device)
    app_read = read_image(app_path, "--app_image_path")
    struct_read = read_image(struct_path, "--struct_image_path")
    check_model(args.model)
    check_model_settings(args, domain_name)
    with output_folders(args.output_path, cache_dir):
        try:
            pipe = load_pipeline(args.model, device, args.dtype)
        except OSError as error:
            if not Path(args.model).is_dir():
                raise not_cached_error(args.model) from None
            raise ValueError(f"--model: cannot load {args.model}: {error}") from None
        transfer_path, strip_path = transfer_pair(
            pipe, args, (app_path, struct_path), (app_read, struct_read), domain_name, cache_dir, args.load_latents
        )
    print(f"Saved {transfer_path} and {strip_path}")


# Subcommands and their modules, imported only when used: `cross-image-attention batch ...`, `... edit ...`.
SUBCOMMANDS = {"batch": "batch", "hub": "hub", "evaluate": "evaluate", "edit": "cli_edit", "style": "cli_style"}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (1 with one `error:` line on stderr for bad input)."""
    # transformers' notices (e.g. that torchvision is missing, which these pipelines do not need) are not the
    # command's business; a user's own TRANSFORMERS_VERBOSITY wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(f".{SUBCOMMANDS[argv[0]]}", __package__).main(argv[1:])
    try:
        run(build_parser().parse_args(argv))
    except (ValueError, TypeError, OSError) as error:
        # One line, also for the multi-line messages of some libraries.
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; finished cache files are kept and reused with --load_latents", file=sys.stderr)
        return 130
    return 0
