"""The metrics of appearance transfer, text-guided editing and style papers, one function per metric.

Every function takes images as PIL images, torch tensors (`(3, H, W)` or `(1, 3, H, W)`, floats in [0, 1] or
uint8) or numpy arrays (`(H, W, 3)`, uint8 or floats in [0, 1]), and returns a Python float. None of them depends
on this project's pipelines: they score any method's outputs.

| function             | measures                           | better | model                         |
|----------------------|------------------------------------|--------|-------------------------------|
| `structure_distance` | structure kept (Splice)            | lower  | DINO ViT-B/8, last layer keys |
| `dino_similarity`    | appearance / style kept ("DINO-I") | higher | DINO ViT-B/8, CLS token       |
| `gram_distance`      | style statistics (Gatys-like)      | lower  | DINO ViT-B/8, patch tokens    |
| `clip_score`         | text alignment                     | higher | CLIP ViT-L/14                 |
| `lpips_distance`     | perceptual difference              | lower  | SqueezeNet (AlexNet, VGG16)   |
| `psnr`               | pixel fidelity                     | higher | none                          |
| `ssim`               | local structure fidelity           | higher | none                          |
| `mse`                | pixel difference                   | lower  | none                          |

Images of different sizes: the second image of a pair is resized to the first one's size (bicubic, antialiased)
before it is compared; the first argument is always the reference (the structure, source or style image) and the
second the output. Models see their own input size after that (see each function).

Masks (editing, PIE-Bench's protocol) mark the *edited* region (white / True / 1); they are resized to the first
image's size (nearest) and thresholded at 0.5. The pixel metrics with a mask score the background: both images are
multiplied by `1 - mask` and the metric is computed over the whole image, as PIE-Bench does; `clip_score` with a
mask scores the edited region: the image multiplied by the mask.

Models load lazily through `MetricModels`, from the Hub cache or local folders, and stay loaded as long as that
object lives: create one and pass it as `models=` to reuse it across calls. Without `models=` a function loads the
default models for that call only.
"""

import importlib.util
import math
import urllib.error
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DINO_MODEL = "facebook/dino-vitb8"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_LPIPS_NET = "squeeze"
# ImageNet statistics (DINO) and CLIP's own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Splice resizes the shorter side to 224 and caps the longer one at 480; other model sizes keep the ratio.
SPLICE_MAX_SIDE_RATIO = 480 / 224
# Gram matrices of the patch tokens after a third, two thirds and all of the transformer blocks (4, 8, 12 of ViT-B).
GRAM_DEPTH_FRACTIONS = (1 / 3, 2 / 3, 1)
# SSIM: Wang et al. 2004's Gaussian window, and its constants for data range 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

# LPIPS (Zhang et al. 2018, v0.1): torchvision's ImageNet backbones and the feature layers the linear heads read.
# Each layer spec is ("conv", in, out, kernel, stride, padding), ("relu",), ("pool", kernel, stride, ceil_mode)
# or ("fire", in, squeeze, expand1x1, expand3x3), in torchvision's order so that its weight files load as they are.
_SQUEEZE_FEATURES = [
    ("conv", 3, 64, 3, 2, 0),
    ("relu",),
    ("pool", 3, 2, True),
    ("fire", 64, 16, 64, 64),
    ("fire", 128, 16, 64, 64),
    ("pool", 3, 2, True),
    ("fire", 128, 32, 128, 128),
    ("fire", 256, 32, 128, 128),
    ("pool", 3, 2, True),
    ("fire", 256, 48, 192, 192),
    ("fire", 384, 48, 192, 192),
    ("fire", 384, 64, 256, 256),
    ("fire", 512, 64, 256, 256),
]
_ALEX_FEATURES = [
    ("conv", 3, 64, 11, 4, 2),
    ("relu",),
    ("pool", 3, 2, False),
    ("conv", 64, 192, 5, 1, 2),
    ("relu",),
    ("pool", 3, 2, False),
    ("conv", 192, 384, 3, 1, 1),
    ("relu",),
    ("conv", 384, 256, 3, 1, 1),
    ("relu",),
    ("conv", 256, 256, 3, 1, 1),
    ("relu",),
]


def _vgg16_features() -> list[tuple]:
    layers, channels = [], 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if width == "M":
            layers.append(("pool", 2, 2, False))
        else:
            layers += [("conv", channels, width, 3, 1, 1), ("relu",)]
            channels = width
    return layers


LPIPS_NETS = {
    # name: (torchvision weights, feature layers, indices of the layers whose outputs LPIPS compares)
    "squeeze": (
        "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
        _SQUEEZE_FEATURES,
        (1, 4, 7, 9, 10, 11, 12),
    ),
    "alex": ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", _ALEX_FEATURES, (1, 4, 7, 9, 11)),
    "vgg": ("https://download.pytorch.org/models/vgg16-397923af.pth", _vgg16_features(), (3, 8, 15, 22, 29)),
}
# LPIPS's input scaling (v0.1), applied to images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "DEFAULT_LPIPS_NET",
    "LPIPS",
    "MetricModels",
    "clip_score",
    "dino_similarity",
    "gram_distance",
    "lpips_distance",
    "mse",
    "psnr",
    "ssim",
    "structure_distance",
    "to_tensor",
]


# Inputs ---------------------------------------------------------------------------------------------------------


def to_tensor(image, name: str = "image") -> torch.Tensor:
    """An image as a float32 `(3, H, W)` tensor in [0, 1] on the CPU.

    Args:
        image: A PIL image (any mode, converted to RGB), a tensor `(3, H, W)` or `(1, 3, H, W)` (floats in [0, 1]
            or uint8), or a numpy array `(H, W, 3)` (uint8, or floats in [0, 1]).
        name: The argument's name, for error messages.
    """
    if isinstance(image, PIL.Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: expected a numpy array of shape (H, W, 3), got {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"{name}: expected a tensor of shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        tensor = tensor.cpu()
    else:
        raise TypeError(f"{name}: expected a PIL image, a torch tensor or a numpy array, got {type(image).__name__}")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or floating point values, got {tensor.dtype}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{name}: expected values in [0, 1] (or uint8), got [{tensor.min():.3g}, {tensor.max():.3g}]")
    return tensor


def to_mask(mask, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """A mask as a float32 `(1, H, W)` tensor of zeros and ones at `size`.

    Args:
        mask: A PIL image (converted to grayscale), a tensor or numpy array `(H, W)` or `(1, H, W)` of booleans or
            numbers in [0, 1] (uint8: [0, 255]). It is resized to `size` (nearest) and thresholded at 0.5.
        size: `(height, width)` of the image it belongs to.
        name: The argument's name, for error messages.
    """
    if isinstance(mask, PIL.Image.Image):
        values = torch.from_numpy(np.array(mask.convert("L"))).float() / 255
    elif isinstance(mask, np.ndarray | torch.Tensor):
        values = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask.detach().cpu())
        if values.ndim == 3 and values.shape[0] == 1:
            values = values[0]
        if values.ndim != 2:
            raise ValueError(f"{name}: expected shape (H, W) or (1, H, W), got {tuple(values.shape)}")
        values = values.float() / 255 if values.dtype == torch.uint8 else values.float()
    else:
        raise TypeError(f"{name}: expected a PIL image, a torch tensor or a numpy array, got {type(mask).__name__}")
    if tuple(values.shape) != tuple(size):
        values = F.interpolate(values[None, None], size=size, mode="nearest")[0, 0]
    return (values >= 0.5).float()[None]


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(3, H, W)` or `(N, 3, H, W)` image(s) in [0, 1] resized to `size` = `(height, width)` (bicubic, antialiased,
    clamped to [0, 1]); returned unchanged when already that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batch = image if image.ndim == 4 else image[None]
    resized = F.interpolate(batch, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    resized = resized.clamp(0, 1)
    return resized if image.ndim == 4 else resized[0]


def _pair(reference, output, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as tensors, the second resized to the first one's size."""
    first, second = to_tensor(reference, names[0]), to_tensor(output, names[1])
    return first, resize(second, first.shape[-2:])


def _normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=batch.dtype, device=batch.device)[:, None, None]
    std_t = torch.tensor(std, dtype=batch.dtype, device=batch.device)[:, None, None]
    return (batch - mean_t) / std_t


def splice_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Splice's global resize: the shorter side becomes `size`, the longer one keeps the aspect ratio up to
    `size * 480 / 224`, where the longer side is capped and the shorter one scaled down with it."""
    short, long = min(height, width), max(height, width)
    max_long = round(size * SPLICE_MAX_SIDE_RATIO)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_long:
        new_short, new_long = int(max_long * short / long), max_long
    return (new_short, new_long) if height <= width else (new_long, new_short)


def center_crop_size(height: int, width: int, size: int) -> tuple[int, int]:
    """CLIP's resize: the shorter side becomes `size` (the crop to `size` x `size` follows)."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


def _groups(shapes: Sequence[tuple], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal shape, in chunks of at most `batch_size`."""
    by_shape: dict[tuple, list[int]] = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in by_shape.values()
        for start in range(0, len(indices), batch_size)
    ]


# LPIPS ----------------------------------------------------------------------------------------------------------


class _Fire(nn.Module):
    """SqueezeNet's fire module, with torchvision's parameter names."""

    def __init__(self, channels: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], dim=1)


def _build_layer(spec: tuple) -> nn.Module:
    kind, *values = spec
    if kind == "conv":
        channels_in, channels_out, kernel, stride, padding = values
        return nn.Conv2d(channels_in, channels_out, kernel_size=kernel, stride=stride, padding=padding)
    if kind == "relu":
        return nn.ReLU()
    if kind == "pool":
        kernel, stride, ceil_mode = values
        return nn.MaxPool2d(kernel_size=kernel, stride=stride, ceil_mode=ceil_mode)
    return _Fire(*values)


def _lpips_heads_file(net: str) -> Path:
    """The linear heads of LPIPS v0.1 as torchmetrics ships them (identical to the `lpips` package's files)."""
    spec = importlib.util.find_spec("torchmetrics")  # found without importing torchmetrics
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "LPIPS needs the linear heads shipped by torchmetrics: pip install 'torchmetrics>=1.1' (the metrics extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "functional" / "image" / "lpips_models" / f"{net}.pth"
    if not path.is_file():
        raise ImportError(f"LPIPS: torchmetrics has no {path.name} (torchmetrics >= 1.1 needed): {path}")
    return path


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al., CVPR 2018): the distance between two images' unit-normalised backbone features,
    weighted per channel by learned linear heads, averaged over space and summed over layers.

    `LPIPS(net)` is untrained; `LPIPS.pretrained(net)` loads torchvision's ImageNet backbone (downloaded from
    download.pytorch.org into torch's hub cache on first use) and LPIPS's linear heads (from torchmetrics).

    Args:
        net: "squeeze" (SqueezeNet 1.1, PIE-Bench's choice), "alex" (AlexNet, LPIPS's default) or "vgg" (VGG16).
    """

    def __init__(self, net: str = DEFAULT_LPIPS_NET):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"lpips_net: expected one of {', '.join(LPIPS_NETS)}, got {net!r}")
        self.net = net
        _, layers, self.taps = LPIPS_NETS[net]
        self.features = nn.Sequential(*(_build_layer(spec) for spec in layers[: max(self.taps) + 1]))
        channels = [self._channels(layers, tap) for tap in self.taps]
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, kernel_size=1, bias=False) for width in channels)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None], persistent=False)
        self.eval().requires_grad_(False)

    @staticmethod
    def _channels(layers: list[tuple], tap: int) -> int:
        for spec in reversed(layers[: tap + 1]):
            if spec[0] == "conv":
                return spec[2]
            if spec[0] == "fire":
                return spec[3] + spec[4]
        raise ValueError(f"no convolution before layer {tap}")

    @classmethod
    def pretrained(cls, net: str = DEFAULT_LPIPS_NET) -> "LPIPS":
        """The LPIPS model with its backbone's ImageNet weights and the paper's linear heads."""
        model = cls(net)
        heads = torch.load(_lpips_heads_file(net), map_location="cpu", weights_only=True)
        for index, head in enumerate(model.heads):
            head.weight.copy_(heads[f"lin{index}.model.1.weight"])
        url = LPIPS_NETS[net][0]
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
        except (OSError, urllib.error.URLError, RuntimeError) as error:
            raise OSError(
                f"lpips_net {net!r}: cannot load torchvision's backbone weights {url} (not in torch's hub cache "
                f"{torch.hub.get_dir()}/checkpoints and not downloadable): {error}"
            ) from None
        features = {
            key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")
        }
        features = {key: value for key, value in features.items() if int(key.split(".")[0]) < len(model.features)}
        model.features.load_state_dict(features)
        return model

    def layer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's outputs at the compared layers for images in [-1, 1]."""
        x = (images - self.shift) / self.scale
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The distance `(N,)` between `(N, 3, H, W)` images in [-1, 1]."""
        total = 0
        for head, a, b in zip(self.heads, self.layer_features(first), self.layer_features(second)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((a - b).pow(2)).mean(dim=(2, 3))
        return total[:, 0]


# Models ---------------------------------------------------------------------------------------------------------


def _load_error(option: str, name: str, error: Exception) -> OSError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return OSError(
        f"{option} {name!r}: cannot load the model (not a local folder, and not in the Hub cache or the Hub is not "
        f"reachable): {first_line}"
    )


class MetricModels:
    """The models of the metrics, loaded on first use and kept while this object lives.

    Args:
        dino_model: Hub id or local folder of a transformers `ViTModel` (DINO ViT-B/8 by default), or the model
            (moved to `device`).
        clip_model: Hub id or local folder of a transformers `CLIPModel` and its tokenizer, or the model (moved to
            `device`).
        clip_tokenizer: The tokenizer when `clip_model` is a model object (default: loaded from `clip_model`).
        lpips_net: "squeeze", "alex" or "vgg" (see [`LPIPS`]), or an [`LPIPS`] model.
        device: Torch device of the models (default: cuda if available, else cpu).
        batch_size: Images per forward pass in the batched methods.
    """

    def __init__(
        self,
        dino_model=DEFAULT_DINO_MODEL,
        clip_model=DEFAULT_CLIP_MODEL,
        clip_tokenizer=None,
        lpips_net=DEFAULT_LPIPS_NET,
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if isinstance(lpips_net, str) and lpips_net not in LPIPS_NETS:
            raise ValueError(f"lpips_net: expected one of {', '.join(LPIPS_NETS)}, got {lpips_net!r}")
        if not isinstance(lpips_net, str | LPIPS):
            raise TypeError(f"lpips_net: expected a name or an LPIPS model, got {type(lpips_net).__name__}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self._dino_source, self._dino = (
            (dino_model, None) if isinstance(dino_model, str | Path) else (None, dino_model)
        )
        self._clip_source, self._clip = (
            (clip_model, None) if isinstance(clip_model, str | Path) else (None, clip_model)
        )
        self._tokenizer = clip_tokenizer
        if self._clip is not None and clip_tokenizer is None:
            raise ValueError("clip_tokenizer: needed when clip_model is a model object")
        self._lpips_source, self._lpips = (lpips_net, None) if isinstance(lpips_net, str) else (None, lpips_net)
        for model in (self._dino, self._clip, self._lpips):
            if model is not None:
                model.to(self.device).eval()

    @property
    def dino_name(self) -> str:
        """The DINO model's Hub id or folder (or its class name when given as an object)."""
        return str(self._dino_source) if self._dino_source is not None else type(self._dino).__name__

    @property
    def clip_name(self) -> str:
        """The CLIP model's Hub id or folder (or its class name when given as an object)."""
        return str(self._clip_source) if self._clip_source is not None else type(self._clip).__name__

    @property
    def lpips_name(self) -> str:
        """The LPIPS backbone's name."""
        return self._lpips_source if self._lpips_source is not None else self._lpips.net

    @property
    def dino(self):
        """The DINO `ViTModel`, loaded on first use."""
        if self._dino is None:
            from transformers import ViTModel

            try:
                model = ViTModel.from_pretrained(str(self._dino_source), add_pooling_layer=False)
            except (OSError, ValueError) as error:
                raise _load_error("dino_model", str(self._dino_source), error) from None
            self._dino = model.to(self.device).eval()
        return self._dino

    @property
    def clip(self):
        """The `CLIPModel`, loaded on first use."""
        if self._clip is None:
            from transformers import AutoTokenizer, CLIPModel

            try:
                model = CLIPModel.from_pretrained(str(self._clip_source))
                self._tokenizer = AutoTokenizer.from_pretrained(str(self._clip_source))
            except (OSError, ValueError) as error:
                raise _load_error("clip_model", str(self._clip_source), error) from None
            self._clip = model.to(self.device).eval()
        return self._clip

    @property
    def tokenizer(self):
        """The CLIP model's tokenizer."""
        self.clip  # noqa: B018 (loads the tokenizer with the model)
        return self._tokenizer

    @property
    def lpips(self) -> LPIPS:
        """The LPIPS model, loaded on first use."""
        if self._lpips is None:
            self._lpips = LPIPS.pretrained(self._lpips_source).to(self.device)
        return self._lpips

    # DINO ---------------------------------------------------------------------------------------------------------

    def _dino_size(self) -> int:
        size = self.dino.config.image_size
        return size if isinstance(size, int) else int(size[0])

    def _dino_forward(self, batch: torch.Tensor, **kwargs):
        pixels = _normalize(batch.to(self.device), IMAGENET_MEAN, IMAGENET_STD)
        return self.dino(pixel_values=pixels.to(self.dino.dtype), interpolate_pos_encoding=True, **kwargs)

    def _last_key_projection(self) -> nn.Module:
        """The key projection of the last attention layer (transformers 5 and 4 module names)."""
        model = self.dino
        layers = getattr(model, "layers", None)
        if layers is None and hasattr(model, "encoder"):
            layers = model.encoder.layer
        if layers is None:
            raise TypeError(f"dino_model: {type(model).__name__} has no transformer layers")
        attention = layers[-1].attention
        for candidate in (
            getattr(attention, "k_proj", None),
            getattr(getattr(attention, "attention", None), "key", None),
        ):
            if isinstance(candidate, nn.Linear):
                return candidate
        raise TypeError(f"dino_model: cannot find the key projection of the last layer of {type(model).__name__}")

    @torch.no_grad()
    def dino_self_similarity(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Splice's structure descriptor of each image: the cosine self-similarity `(T, T)` of the keys of the last
        attention layer over all tokens (CLS included), heads concatenated.

        Args:
            images: `(3, H, W)` tensors in [0, 1]; each is resized with [`splice_size`] (shorter side = the model's
                image size, 224 for DINO ViT-B/8), then normalised with ImageNet's mean and std.
        """
        size = self._dino_size()
        prepared = [resize(image, splice_size(*image.shape[-2:], size)) for image in images]
        results: list[torch.Tensor | None] = [None] * len(prepared)
        captured = []
        hook = self._last_key_projection().register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            for group in _groups([image.shape for image in prepared], self.batch_size):
                captured.clear()
                self._dino_forward(torch.stack([prepared[i] for i in group]))
                keys = F.normalize(captured[-1].float(), dim=-1, eps=1e-8)
                for i, similarity in zip(group, keys @ keys.transpose(1, 2)):
                    results[i] = similarity
        finally:
            hook.remove()
        return results

    @torch.no_grad()
    def dino_cls(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The CLS token of the last layer (after the final layer norm), `(N, D)`, as DINO-I compares them.

        Args:
            images: `(3, H, W)` tensors in [0, 1], resized to the model's image size squared (224 x 224 for DINO
                ViT-B/8, bicubic, like `facebook/dino-vitb8`'s image processor) and ImageNet-normalised.
        """
        size = self._dino_size()
        batch = torch.stack([resize(image, (size, size)) for image in images])
        out = [
            self._dino_forward(batch[start : start + self.batch_size]).last_hidden_state[:, 0].float()
            for start in range(0, len(batch), self.batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def dino_gram(self, images: Sequence[torch.Tensor], layers: Sequence[int] | None = None) -> list:
        """Per image, the Gram matrices `(D, D)` of the patch tokens after each of `layers` (1-based blocks; default:
        after a third, two thirds and all of the blocks, 4, 8 and 12 for ViT-B), each divided by the number of
        tokens. Images are prepared as in [`dino_cls`]."""
        depth = self.dino.config.num_hidden_layers
        if layers is None:
            layers = sorted({max(1, round(depth * fraction)) for fraction in GRAM_DEPTH_FRACTIONS})
        for layer in layers:
            if not isinstance(layer, int) or not 1 <= layer <= depth:
                raise ValueError(f"layers: expected block numbers in [1, {depth}], got {layer!r}")
        size = self._dino_size()
        batch = torch.stack([resize(image, (size, size)) for image in images])
        grams = []
        for start in range(0, len(batch), self.batch_size):
            hidden = self._dino_forward(
                batch[start : start + self.batch_size], output_hidden_states=True
            ).hidden_states
            per_layer = []
            for layer in layers:
                tokens = hidden[layer][:, 1:].float()
                per_layer.append(tokens.transpose(1, 2) @ tokens / tokens.shape[1])
            grams += [[gram[i] for gram in per_layer] for i in range(per_layer[0].shape[0])]
        return grams

    # CLIP ---------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def clip_image_embeddings(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Unit CLIP image embeddings `(N, D)`.

        Args:
            images: `(3, H, W)` tensors in [0, 1]; each is resized so that its shorter side is the model's image
                size (224 for ViT-L/14, bicubic), centre-cropped to a square and normalised with CLIP's mean and std.
        """
        model = self.clip
        size = model.config.vision_config.image_size
        prepared = []
        for image in images:
            height, width = center_crop_size(*image.shape[-2:], size)
            image = resize(image, (height, width))
            top, left = (height - size) // 2, (width - size) // 2
            prepared.append(image[:, top : top + size, left : left + size])
        batch = _normalize(torch.stack(prepared), CLIP_MEAN, CLIP_STD)
        embeddings = []
        for start in range(0, len(batch), self.batch_size):
            pixels = batch[start : start + self.batch_size].to(self.device, model.dtype)
            pooled = model.vision_model(pixel_values=pixels).pooler_output
            embeddings.append(model.visual_projection(pooled).float())
        return F.normalize(torch.cat(embeddings), dim=-1)

    @torch.no_grad()
    def clip_text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit CLIP text embeddings `(N, D)`; prompts longer than the model's context (77 tokens) are cut."""
        model = self.clip
        embeddings = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
            pooled = model.text_model(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            ).pooler_output
            embeddings.append(model.text_projection(pooled).float())
        return F.normalize(torch.cat(embeddings), dim=-1)


# Distances between descriptors (shared by the functions below and by `evaluate`) --------------------------------


def self_similarity_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Splice's structure loss: the mean squared difference between two self-similarity matrices."""
    if first.shape != second.shape:
        raise ValueError(f"self-similarity matrices differ in shape: {tuple(first.shape)} and {tuple(second.shape)}")
    return float((first.float() - second.float()).pow(2).mean())


def cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    """The cosine similarity of two vectors (in float64, clamped to [-1, 1])."""
    similarity = F.cosine_similarity(first.double().flatten(), second.double().flatten(), dim=0, eps=1e-12)
    return float(similarity.clamp(-1, 1))


def gram_matrices_distance(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> float:
    """The mean over layers of the mean squared difference between Gram matrices."""
    return float(sum((a - b).pow(2).mean() for a, b in zip(first, second)) / len(first))


def clip_score_from_embeddings(image: torch.Tensor, text: torch.Tensor) -> float:
    """`100 * max(cos(image, text), 0)` of two unit embeddings (torchmetrics' CLIPScore convention)."""
    return 100 * max(float((image.float() * text.float()).sum()), 0.0)


# Metrics --------------------------------------------------------------------------------------------------------


def _models(models: MetricModels | None) -> MetricModels:
    if models is None:
        return MetricModels()
    if not isinstance(models, MetricModels):
        raise TypeError(f"models: expected a MetricModels object or None, got {type(models).__name__}")
    return models


def structure_distance(reference, output, models: MetricModels | None = None) -> float:
    """DINO-ViT self-similarity distance (Splice, Tumanyan et al., CVPR 2022; the "structure distance" of
    Plug-and-Play, PIE-Bench and Ctrl-X). Lower is better: 0 for identical images; it ignores appearance and
    measures how far the output's spatial layout is from the reference's.

    The keys of the last attention layer of DINO ViT-B/8 (`facebook/dino-vitb8`), all tokens with CLS, heads
    concatenated; their cosine self-similarity matrix; the mean squared difference between the two images'
    matrices. Input: the output is first resized to the reference's size; then Splice's global resize (shorter side
    224, longer side at most 480, aspect kept), ImageNet mean/std. PIE-Bench reports it multiplied by 1000.

    Args:
        reference: The structure image (appearance transfer) or the source image (editing).
        output: The generated image, resized to the reference's size if it differs.
        models: The models to use (default: load the default models for this call).
    """
    first, second = _pair(reference, output, ("reference", "output"))
    similarities = _models(models).dino_self_similarity([first, second])
    return self_similarity_distance(*similarities)


def dino_similarity(reference, output, models: MetricModels | None = None) -> float:
    """DINO-I: the cosine similarity between the DINO ViT-B/8 CLS tokens of two images (DreamBooth's subject
    fidelity measure, used for appearance and style by Ctrl-X, StyleAligned and Visual Style Prompting). Higher is
    better: 1 for identical images, about invariant to the layout (a flip barely changes it).

    Model `facebook/dino-vitb8`, CLS token of the last layer after the final layer norm; input resized to
    224 x 224 (bicubic, no crop), ImageNet mean/std. Symmetric in its arguments.

    Args:
        reference: The appearance image (appearance transfer) or the style reference (style).
        output: The generated image.
        models: The models to use (default: load the default models for this call).
    """
    first, second = to_tensor(reference, "reference"), to_tensor(output, "output")
    embeddings = _models(models).dino_cls([first, second])
    return cosine(embeddings[0], embeddings[1])


def gram_distance(reference, output, models: MetricModels | None = None, layers: Sequence[int] | None = None) -> float:
    """A Gram-matrix style distance (after Gatys et al., CVPR 2016), on DINO ViT-B/8 patch tokens instead of VGG-19
    features (VGG-19 does not load through transformers). Lower is better: 0 for identical images; it compares
    feature statistics and ignores where things are. Its scale is not comparable with VGG Gram losses in papers:
    use it to compare runs with each other.

    For each of `layers`, the Gram matrix `F^T F / T` of the `T` patch tokens `F` after that block; the mean over
    layers of the mean squared difference. Input as in [`dino_similarity`]. Symmetric in its arguments.

    Args:
        reference: The style reference (or appearance) image.
        output: The generated image.
        models: The models to use (default: load the default models for this call).
        layers: 1-based transformer blocks whose outputs are compared (default: 4, 8 and 12 of ViT-B's 12; a
            third, two thirds and all of another depth).
    """
    first, second = to_tensor(reference, "reference"), to_tensor(output, "output")
    grams = _models(models).dino_gram([first, second], layers)
    return gram_matrices_distance(grams[0], grams[1])


def clip_score(image, prompt: str, models: MetricModels | None = None, mask=None) -> float:
    """CLIP score: `100 * max(cos(E_image, E_text), 0)` with CLIP ViT-L/14 (`openai/clip-vit-large-patch14`), the
    convention of torchmetrics' `CLIPScore`, which PIE-Bench uses (Hessel et al.'s CLIPScore is `2.5 * max(cos, 0)`:
    divide by 40 to compare). Higher is better; typical values for matching pairs are in the 20s and 30s.

    Input: shorter side resized to 224 (bicubic), centre crop 224 x 224, CLIP's mean/std; the prompt is cut at 77
    tokens.

    Args:
        image: The generated image.
        prompt: The text it should show (the target prompt when editing).
        models: The models to use (default: load the default models for this call).
        mask: The edited region: when given, the image is multiplied by it first (PIE-Bench's "edited" CLIP
            similarity).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
    tensor = to_tensor(image, "image")
    if mask is not None:
        tensor = tensor * to_mask(mask, tuple(tensor.shape[-2:]))
    models = _models(models)
    return clip_score_from_embeddings(
        models.clip_image_embeddings([tensor])[0], models.clip_text_embeddings([prompt])[0]
    )


def _masked_pair(source, edit, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair, the edit resized to the source's size, both multiplied by `1 - mask` when a mask is given."""
    first, second = _pair(source, edit, ("source", "edit"))
    if mask is not None:
        keep = 1 - to_mask(mask, tuple(first.shape[-2:]))
        first, second = first * keep, second * keep
    return first, second


def mse(source, edit, mask=None) -> float:
    """Mean squared error over pixels and channels, data range [0, 1] (PIE-Bench's MSE). Lower is better.

    Args:
        source: The source image.
        edit: The edited image, resized to the source's size if it differs.
        mask: The edited region; when given, both images are multiplied by `1 - mask` (PIE-Bench's background
            preservation).
    """
    first, second = _masked_pair(source, edit, mask)
    return float((first.double() - second.double()).pow(2).mean())


def psnr(source, edit, mask=None) -> float:
    """Peak signal-to-noise ratio `10 log10(1 / MSE)` in dB, data range [0, 1], over all pixels and channels
    (PIE-Bench's PSNR). Higher is better; `inf` for identical images.

    Args:
        source: The source image.
        edit: The edited image, resized to the source's size if it differs.
        mask: The edited region; when given, both images are multiplied by `1 - mask` (PIE-Bench's background
            preservation).
    """
    error = mse(source, edit, mask)
    return math.inf if error == 0 else 10 * math.log10(1 / error)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    return weights[:, None] * weights[None, :]


def ssim(source, edit, mask=None) -> float:
    """Structural similarity (Wang et al., IEEE TIP 2004), data range [0, 1]. Higher is better, 1 for identical
    images.

    Per channel, Gaussian-weighted local means, variances and covariance (window 11, sigma 1.5, K1 0.01, K2 0.03),
    the SSIM map over the window positions that fit in the image ("valid"), averaged over positions and channels:
    Wang et al.'s reference code (`filter2(..., 'valid')`) and torchmetrics' `StructuralSimilarityIndexMeasure(
    data_range=1.0)` of PIE-Bench's time (torchmetrics 1.1, 1.2). Newer torchmetrics releases also average a
    reflect-padded border, which moves the value by about 1e-3. Images need sides of at least 11 pixels.

    Args:
        source: The source image.
        edit: The edited image, resized to the source's size if it differs.
        mask: The edited region; when given, both images are multiplied by `1 - mask` (PIE-Bench's background
            preservation).
    """
    first, second = _masked_pair(source, edit, mask)
    if min(first.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"source: SSIM needs sides of at least {SSIM_WINDOW} pixels, got {tuple(first.shape[-2:])}")
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA)[None, None].repeat(3, 1, 1, 1)
    x, y = first.double()[None], second.double()[None]

    def local_mean(values: torch.Tensor) -> torch.Tensor:
        return F.conv2d(values, window, groups=3)

    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x**2
    var_y = local_mean(y * y) - mean_y**2
    cov = local_mean(x * y) - mean_x * mean_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def lpips_distance(source, edit, models: MetricModels | None = None, mask=None) -> float:
    """LPIPS v0.1 (Zhang et al., CVPR 2018) with the backbone of `models` (default SqueezeNet 1.1, as PIE-Bench;
    AlexNet is LPIPS's own default). Lower is better, 0 for identical images. Symmetric in its arguments.

    Input: the images at the source's size (no resize to 224), scaled to [-1, 1]. Needs torchmetrics (the linear
    heads: the `metrics` extra, `pip install ".[metrics]"`) and torchvision's backbone weights from
    download.pytorch.org (cached on first use in torch's hub folder).

    Args:
        source: The source image.
        edit: The edited image, resized to the source's size if it differs.
        models: The models to use (default: load the default models for this call).
        mask: The edited region; when given, both images are multiplied by `1 - mask` (PIE-Bench's background
            preservation).
    """
    first, second = _masked_pair(source, edit, mask)
    model = _models(models).lpips
    device = next(model.parameters()).device
    with torch.no_grad():
        return float(model(first[None].to(device) * 2 - 1, second[None].to(device) * 2 - 1)[0])
