"""AdaIN on latents, plain and masked, as the reference applies it to the output branch after each DDPM step."""

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

ADAIN_EPS = 1e-5


def channel_mean_std(features: torch.Tensor, mask: torch.Tensor = None, eps: float = ADAIN_EPS) -> tuple:
    """Per-channel mean and ``sqrt(unbiased variance + eps)`` of one latent.

    Args:
        features (`torch.Tensor`): One latent, `[C, H, W]`.
        mask (`torch.Tensor`, *optional*): `[H, W]`; when given, only pixels where it equals 1 count.

    Returns:
        `(mean, std)`, each `[C, 1, 1]`.
    """
    channels = features.shape[0]
    flat = features.reshape(channels, -1)
    if mask is not None:
        flat = flat[:, mask.reshape(-1) == 1]
    # The reference adds eps to the unbiased variance, then takes the square root.
    std = (flat.var(dim=1) + eps).sqrt().view(channels, 1, 1)
    mean = flat.mean(dim=1).view(channels, 1, 1)
    return mean, std


def adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give ``content`` the per-channel mean and std of ``style`` (both `[C, H, W]`)."""
    content_mean, content_std = channel_mean_std(content)
    style_mean, style_std = channel_mean_std(style)
    return (content - content_mean) / content_std * style_std + style_mean


def masked_adain(
    content: torch.Tensor, style: torch.Tensor, content_mask: torch.Tensor, style_mask: torch.Tensor
) -> torch.Tensor:
    """AdaIN with statistics restricted to the masks; pixels outside ``content_mask`` keep their values.

    Args:
        content (`torch.Tensor`): `[C, H, W]`, the output branch latent.
        style (`torch.Tensor`): `[C, H, W]`, the appearance branch latent.
        content_mask (`torch.Tensor`): `[H, W]` of 0/1, the structure image's object mask.
        style_mask (`torch.Tensor`): `[H, W]` of 0/1, the appearance image's object mask.

    Each mask needs at least two pixels, else the unbiased variance is NaN; callers check with
    [`mask_supports_adain`] first.
    """
    content_mean, content_std = channel_mean_std(content, content_mask)
    style_mean, style_std = channel_mean_std(style, style_mask)
    stylised = (content - content_mean) / content_std * style_std + style_mean
    content_mask = content_mask.to(content.dtype)
    return content * (1 - content_mask) + stylised * content_mask


def mask_supports_adain(mask: torch.Tensor) -> bool:
    """Whether masked statistics are finite: the unbiased variance needs at least two pixels inside the mask."""
    return int((mask == 1).sum()) >= 2


def usable_pair_masks(pair_masks: list) -> list:
    """Replace the masks of a pair by None (plain AdaIN) when one of them is (near-)empty.

    The reference computes masked statistics regardless; with fewer than two pixels they are NaN and the whole output
    turns black (its open "black image" issue). Falling back to plain AdaIN keeps the output finite.

    Args:
        pair_masks: Per pair, `(appearance mask, structure mask)` on the latent grid.
    """
    usable = []
    for pair, masks in enumerate(pair_masks):
        if all(mask_supports_adain(mask) for mask in masks):
            usable.append(masks)
        else:
            logger.warning(
                "An object mask of pair %d covers fewer than two latent pixels, so masked AdaIN would give NaN; "
                "plain AdaIN is used for this pair instead.",
                pair,
            )
            usable.append(None)
    return usable


def adain_per_pair(out_latents: torch.Tensor, app_latents: torch.Tensor, pair_masks: list | None) -> torch.Tensor:
    """AdaIN of every output latent towards its appearance latent, masked for pairs that have usable masks.

    Args:
        out_latents, app_latents: `[P, C, h, w]`.
        pair_masks: Per pair, `(appearance mask, structure mask)` or None (plain AdaIN); None for all plain.
    """
    results = []
    for pair, (content, style) in enumerate(zip(out_latents, app_latents)):
        masks = pair_masks[pair] if pair_masks is not None else None
        if masks is None:
            results.append(adain(content, style))
        else:
            app_mask, struct_mask = (m.to(content.device) for m in masks)
            results.append(masked_adain(content, style, struct_mask, app_mask))
    return torch.stack(results)
