"""AdaIN on latents, plain and masked, as the reference applies it to the output branch after each DDPM step."""

import torch

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
