"""The FreeU variant of the reference implementation (not diffusers' ``enable_freeu``).

The reference amplifies and low-pass filters the *backbone* tensor that enters each decoder (up) block, never the
skip connections, and it does so in every UNet call (inversion and denoising, every branch). Its gates are literal
channel counts of SD 1.5 (1280 and 640); here they are derived from the UNet: inputs with the largest channel count
get ``(1.2, 0.9)``, inputs with half of it get ``(1.4, 0.2)``, which selects the same blocks on SD 1.5 and scales to
other SD-shaped UNets.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.fft as fft

# (backbone scale for the first half of the channels, scale of the central low frequencies)
LARGEST_CHANNELS_FACTORS = (1.2, 0.9)
HALF_CHANNELS_FACTORS = (1.4, 0.2)


def fourier_lowpass_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply the central 2x2 block of the (shifted) 2-D spectrum of ``x`` by ``scale``.

    Args:
        x (`torch.Tensor`): Features of shape `[B, C, H, W]`.
        scale (`float`): Factor for the frequencies `[H//2-1 : H//2+1, W//2-1 : W//2+1]` after `fftshift`.

    Returns:
        `torch.Tensor`: The real part of the inverse transform, in the dtype of `x`. The FFT runs in float32 because
        half-precision FFTs are unsupported on CPU and restricted to power-of-two sizes on CUDA.
    """
    x_freq = fft.fftshift(fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x_freq.shape[-2:]
    mask = torch.ones(x_freq.shape, device=x.device)
    mask[..., height // 2 - 1 : height // 2 + 1, width // 2 - 1 : width // 2 + 1] = scale
    x_freq = fft.ifftshift(x_freq * mask, dim=(-2, -1))
    return fft.ifftn(x_freq, dim=(-2, -1)).real.to(x.dtype)


def apply_backbone_freeu(hidden_states: torch.Tensor, backbone_scale: float, frequency_scale: float) -> torch.Tensor:
    """Scale the first half of the channels by ``backbone_scale``, then filter with ``frequency_scale``."""
    half = hidden_states.shape[1] // 2
    hidden_states = torch.cat([hidden_states[:, :half] * backbone_scale, hidden_states[:, half:]], dim=1)
    return fourier_lowpass_scale(hidden_states, frequency_scale)


def up_block_input_channels(unet) -> list:
    """Channel count of the backbone tensor entering each up block (the mid block's output, then each up block's)."""
    reversed_channels = list(reversed(unet.config.block_out_channels))
    return [reversed_channels[0]] + reversed_channels[: len(unet.up_blocks) - 1]


def freeu_factors_per_up_block(unet) -> dict[int, tuple[float, float]]:
    """Which up blocks the reference's FreeU touches, and with which ``(backbone, frequency)`` factors.

    On SD 1.5 (inputs 1280, 1280, 1280, 640) this is ``{0: (1.2, 0.9), 1: (1.2, 0.9), 2: (1.2, 0.9), 3: (1.4, 0.2)}``.
    """
    channels = up_block_input_channels(unet)
    largest = max(channels)
    factors = {}
    for index, count in enumerate(channels):
        if count == largest:
            factors[index] = LARGEST_CHANNELS_FACTORS
        elif 2 * count == largest:
            factors[index] = HALF_CHANNELS_FACTORS
    return factors


@contextmanager
def reference_freeu(unet, factors: dict[int, tuple[float, float]] | None = None) -> Iterator[None]:
    """Apply the reference's FreeU inside the ``with`` block, via forward pre-hooks on the up blocks.

    The hooks are removed on exit, also when the block raises.

    Args:
        unet: A `UNet2DConditionModel`.
        factors (`dict`, *optional*): Up-block index to `(backbone_scale, frequency_scale)`; defaults to
            [`freeu_factors_per_up_block`].
    """
    factors = freeu_factors_per_up_block(unet) if factors is None else factors
    handles = []

    def make_hook(backbone_scale, frequency_scale):
        def hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = apply_backbone_freeu(
                    kwargs["hidden_states"], backbone_scale, frequency_scale
                )
            else:
                args = (apply_backbone_freeu(args[0], backbone_scale, frequency_scale),) + tuple(args[1:])
            return args, kwargs

        return hook

    try:
        for index, (backbone_scale, frequency_scale) in factors.items():
            hook = make_hook(backbone_scale, frequency_scale)
            handles.append(unet.up_blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
