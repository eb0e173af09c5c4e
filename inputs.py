"""Argument, image and mask coercion shared by the pipelines and the front ends (command line, batch, demo).

Every function raises a `TypeError` or `ValueError` that names the argument and says what is allowed, before any
model runs.
"""

import math
import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
RangeInput = tuple[int, int]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Upper bound of every guidance scale and of the contrast strength. The reference uses 3.5 and 1.67; up to 100 the
# float32 latents stay finite (checked on the tests' tiny model up to 10^4), while 10^30 and beyond overflow to NaN
# and would decode to a black image.
MAX_SCALE = 100.0


def check_range(value, name: str) -> RangeInput:
    """A ``(start, end)`` pair of step indices with ``0 <= start <= end`` (a ``range`` of step 1 is accepted)."""
    if isinstance(value, range):
        # A stepped range names steps that `(start, end)` cannot express; taking its bounds would run every step.
        if value.step != 1:
            raise ValueError(f"`{name}` must be a (start, end) pair or a range of step 1, got {value!r}.")
        value = (value.start, value.stop)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"`{name}` must be a (start, end) pair of step indices, got {value!r}.")
    start, end = value
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, end)):
        raise TypeError(f"`{name}` must hold two integers, got {value!r}.")
    if not 0 <= start <= end:
        raise ValueError(f"`{name}` must satisfy 0 <= start <= end, got {value!r}.")
    return int(start), int(end)


def check_scale(value, name: str, minimum: float = 0.0, maximum: float = MAX_SCALE) -> float:
    """A real number in ``[minimum, maximum]`` (finite: larger values overflow the latents to NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not (math.isfinite(value) and minimum <= value <= maximum):
        raise ValueError(f"`{name}` must be a finite number in [{minimum:g}, {maximum:g}], got {value}.")
    return float(value)


def check_bool(value, name: str) -> bool:
    """`True` or `False` only: a string such as ``"false"`` is truthy and would silently mean True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_int(value, name: str, minimum: int) -> int:
    """An integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def check_size(height, width, multiple: int) -> tuple[int, int]:
    """Image height and width in pixels: integers, positive multiples of ``multiple``."""
    for name, value in (("height", height), ("width", width)):
        check_int(value, name, multiple)
        if value % multiple:
            raise ValueError(f"`{name}` must be a multiple of {multiple}, got {value}.")
    return int(height), int(width)


def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    return output_type


def check_callback(callback, tensor_inputs, allowed: list[str]) -> list[str]:
    """Validate `callback_on_step_end` and its tensor inputs; returns the tensor names the callback receives."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    if callback is not None and not callable(callback):
        raise TypeError("`callback_on_step_end` must be callable.")
    unknown = set(tensor_inputs) - set(allowed)
    if unknown:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` may only hold {allowed}, got {sorted(unknown)}.")
    return list(tensor_inputs)


def per_item(value, name: str, count: int, kinds=(str,)) -> list:
    """Broadcast a value or a list of length 1 to ``count`` entries (None entries are allowed)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if item is not None and not isinstance(item, kinds):
            raise TypeError(f"`{name}` must be a {' or '.join(k.__name__ for k in kinds)} or a list of them.")
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"`{name}` has {len(values)} entries but {count} are needed.")
    return values


def generators_per_item(generator, count: int) -> list:
    """One entry per item: a list of generators must have ``count`` entries; one generator (or None, the global
    RNG) draws for every item, one after the other."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"`generator` is a list of {len(generator)} but {count} are needed.")
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("`generator` list entries must be torch.Generator objects.")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")
    return [generator] * count


def as_image_list(images, name: str) -> list | None:
    """Split an image argument into a list of single images (4-D arrays and tensors are batches)."""
    if images is None:
        return None
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError(f"`{name}` is an empty list.")
    return images


def load_image(source) -> PIL.Image.Image:
    """Decode an image file to RGB as `diffusers.utils.load_image` does, with two corrections; the command line,
    batch runs and Python users (`cross_image_attention.load_image`) share it.

    The EXIF orientation is applied and grayscale, palette and alpha images become RGB (alpha is dropped), as in
    diffusers. 16-bit images (PNG `I;16`, `I`) are scaled to 8 bits, where Pillow's `convert("RGB")` (and so
    diffusers) clips every value above 255 to white. An image too large for Pillow's decompression-bomb limit is
    refused.

    Args:
        source: A file path or a binary file object.

    Raises:
        ValueError: For a file that is not a readable image, or one too large.
    """
    if not isinstance(source, (str, os.PathLike)) and not hasattr(source, "read"):
        raise TypeError(f"`source` must be a file path or a binary file, got {type(source).__name__}.")
    try:
        with PIL.Image.open(source) as opened:
            image = PIL.ImageOps.exif_transpose(opened)
            image.load()
    except PIL.UnidentifiedImageError:
        raise ValueError("not an image") from None
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"image too large: {error}") from None
    except OSError as error:  # e.g. a truncated file
        raise ValueError(f"cannot read the image: {error}") from None
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (`I` holds them as int32): scale 0..65535 to 0..255 instead of clipping.
        samples = np.asarray(image, dtype=np.float64)
        image = PIL.Image.fromarray(np.clip(np.round(samples * 255.0 / 65535.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def centre_crop_box(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int, int, int]:
    """The largest centred box of the target aspect; offsets use integer division, as the CIA reference does."""
    # At least one pixel: a 1-pixel side at another aspect would round to an empty crop.
    if width * target_height > height * target_width:  # too wide
        new_width = max(1, round(height * target_width / target_height))
        left = (width - new_width) // 2
        return left, 0, left + new_width, height
    new_height = max(1, round(width * target_height / target_width))
    top = (height - new_height) // 2
    return 0, top, width, top + new_height


def image_to_pixels(image: ImageInput, name: str, height: int, width: int, image_processor) -> torch.Tensor:
    """One image to a `[1, 3, height, width]` float32 tensor in [-1, 1]: centre crop to the target aspect, then
    resize (Pillow, with the image processor's filter, for PIL images and uint8 arrays), then ``2 x - 1``.

    Args:
        image: A PIL image (RGB), a numpy array (`[H, W, 3]`, uint8 or float in [0, 1]) or a tensor (`[3, H, W]`
            float in [0, 1]).
        name: The argument's name, for errors.
        image_processor (`VaeImageProcessor`): Resizes PIL images (its `resample` filter) and normalises.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"`{name}` as a uint8 array must be [H, W, 3] RGB, got shape {image.shape}.")
        image = PIL.Image.fromarray(image)
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            raise ValueError(
                f"`{name}` must be an RGB image, got mode {image.mode!r} (RGBA, grayscale and palette images are "
                "not accepted); convert it with `image.convert('RGB')`."
            )
        if min(image.size) < 1:
            raise ValueError(f"`{name}` is empty ({image.size[0]}x{image.size[1]}).")
        image = image.crop(centre_crop_box(*image.size, width, height))
        return image_processor.preprocess(image, height=height, width=width).float()

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"`{name}` as a float array must be [H, W, 3] RGB, got shape {image.shape}.")
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"`{name}` arrays must be uint8 or float in [0, 1], got dtype {image.dtype}.")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"`{name}` as a tensor must be [3, H, W] RGB, got shape {tuple(image.shape)}.")
        if not image.is_floating_point():
            raise TypeError(f"`{name}` tensors must be float in [0, 1], got dtype {image.dtype}.")
    else:
        raise TypeError(
            f"`{name}` must be a PIL image, a numpy array, a torch tensor or a list of them, "
            f"got {type(image).__name__}."
        )
    image = image.float().cpu()
    if image.numel() == 0 or not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ValueError(f"`{name}` must be a non-empty float image with values in [0, 1].")
    left, top, right, bottom = centre_crop_box(image.shape[2], image.shape[1], width, height)
    image = image[None, :, top:bottom, left:right]
    if image.shape[-2:] != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return image.clamp(0, 1) * 2 - 1


def mask_to_latent_grid(mask, name: str, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """A user mask (any size; nonzero = inside) to a `[h, w]` 0/1 float mask on the latent grid: centre crop to the
    target aspect like the image, then nearest-neighbour resize."""
    if isinstance(mask, PIL.Image.Image):
        mask = np.array(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a PIL image, a numpy array or a torch tensor, got {type(mask).__name__}.")
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask.squeeze(0) if mask.shape[0] == 1 else mask.squeeze(-1)
    if mask.ndim != 2 or mask.numel() == 0:
        raise ValueError(f"`{name}` must be a 2-D [H, W] mask, got shape {tuple(mask.shape)}.")
    left, top, right, bottom = centre_crop_box(mask.shape[1], mask.shape[0], width, height)
    mask = (mask[top:bottom, left:right] != 0).float().cpu()
    latent_size = (height // vae_scale_factor, width // vae_scale_factor)
    return F.interpolate(mask[None, None], size=latent_size, mode="nearest")[0, 0]
