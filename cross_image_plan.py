"""Cross-Image Attention's schedule: which layers it edits, and what each denoising step does (pure functions).

Words used throughout: *cross-image attention* is the edit (the output's queries attend to the appearance's, or at
some steps the structure's, keys and values: a [`KeyValueInjection`] from the *donor*); *appearance guidance*
(the reference's ``swap_guidance_scale``) extrapolates the output's noise from a *plain pass* (no edit) towards the
*cross-image pass*. Row groups of a UNet call: ``out`` (cross-image pass), ``out_plain`` (plain pass),
``appearance``, ``structure``, each with one row per image pair.
"""

from dataclasses import dataclass

import numpy as np

from .attention_control import KeyValueInjection, MapCapture
from .attention_processors import list_attention_layers

# Level 0 is the decoder's highest-resolution attention level (64x64 tokens for SD 1.5 at 512 px), governed by
# `cross_attn_64_range`; level 1 is the next one (32x32 tokens), governed by `cross_attn_32_range`.
HIGHEST_RESOLUTION_LEVEL = 0
SECOND_RESOLUTION_LEVEL = 1
# The reference alternates donors: every fifth step (by its lagging counter) among the first forty the output
# attends to the structure's keys and values instead of the appearance's.
STRUCTURE_DONOR_PERIOD = 5
STRUCTURE_DONOR_UNTIL = 40
ROW_GROUPS = ("out", "out_plain", "appearance", "structure")


@dataclass(frozen=True)
class CrossImageLayers:
    """The attention layers the method uses, by processor name (the keys of ``unet.attn_processors``).

    Args:
        levels: Decoder self-attention layers of the two highest-resolution levels, with their level (0 or 1).
        capture_self: The last self-attention layer of level 0 (source of the segmentation clusters).
        capture_cross: The last cross-attention layer of level 1 (source of the noun maps), if the UNet has one.
    """

    levels: dict[str, int]
    capture_self: str
    capture_cross: str | None

    @property
    def names(self) -> list[str]:
        """Every layer that gets the controlled processor."""
        return list(self.levels) + ([self.capture_cross] if self.capture_cross is not None else [])


def select_cross_image_layers(unet) -> CrossImageLayers:
    """The decoder's two highest-resolution self-attention levels (SD 1.5: the three ``attn1`` of ``up_blocks.3``,
    level 0, and of ``up_blocks.2``, level 1: the reference's layers at 512 px, for any image size)."""
    decoder = [layer for layer in list_attention_layers(unet) if layer.place == "up"]
    factors = sorted({layer.downsampling for layer in decoder})[:2]
    levels = {
        layer.name: factors.index(layer.downsampling)
        for layer in decoder
        if layer.is_self_attention and layer.downsampling in factors
    }
    highest = [name for name, level in levels.items() if level == HIGHEST_RESOLUTION_LEVEL]
    if not highest:
        raise ValueError("The UNet's decoder has no self-attention layer; cross-image attention needs them.")
    cross = [
        layer.name
        for layer in decoder
        if not layer.is_self_attention and len(factors) > 1 and layer.downsampling == factors[SECOND_RESOLUTION_LEVEL]
    ]
    return CrossImageLayers(levels, highest[-1], cross[-1] if cross else None)


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step does, by the reference's rules.

    Args:
        attention_levels: Decoder levels with cross-image attention at this step.
        donor: The row group whose keys and values the output takes: ``"appearance"`` or ``"structure"``.
        guidance_scale: Appearance guidance scale of this step, or None when guidance is inactive.
        adain: AdaIN is applied to the output after the step.
        capture: The step's attention maps feed self-segmentation (masks are made after its DDPM update).
    """

    attention_levels: frozenset
    donor: str
    guidance_scale: float | None
    adain: bool
    capture: bool


def plan_denoising_steps(
    num_steps: int,
    cross_attn_64_range: tuple[int, int],
    cross_attn_32_range: tuple[int, int],
    adain_range: tuple[int, int],
    swap_guidance_scale: float,
    segment: bool,
) -> list[StepPlan]:
    """The reference's gates for each loop index ``i`` of the denoising loop."""
    level_ranges = {HIGHEST_RESOLUTION_LEVEL: cross_attn_64_range, SECOND_RESOLUTION_LEVEL: cross_attn_32_range}
    guidance_start = min(cross_attn_32_range[0], cross_attn_64_range[0])
    guidance_end = max(cross_attn_32_range[1], cross_attn_64_range[1])
    guidance_scales = np.linspace(swap_guidance_scale, max(swap_guidance_scale / 2, 1.0), num_steps)
    plan = []
    for i in range(num_steps):
        # Quirk: the reference's attention gates read a step counter that is updated at the end of each step, so
        # they lag one step behind the loop index (guidance and AdaIN use the index itself).
        counter = max(i - 1, 0)
        levels = frozenset(level for level, (start, end) in level_ranges.items() if start <= counter < end)
        # Appearance guidance; the range test is inclusive at both ends, as in the reference. Where no layer has
        # cross-image attention the plain pass equals the cross-image pass and guidance is the identity: not run.
        guided = swap_guidance_scale > 1 and guidance_start <= i <= guidance_end and bool(levels)
        structure_donor = counter % STRUCTURE_DONOR_PERIOD == 0 and counter < STRUCTURE_DONOR_UNTIL
        plan.append(
            StepPlan(
                attention_levels=levels,
                donor="structure" if structure_donor else "appearance",
                guidance_scale=float(guidance_scales[i]) if guided else None,
                adain=adain_range[0] <= i < adain_range[1],
                capture=segment and i == adain_range[0],
            )
        )
    return plan


def structure_last_use(plan: list[StepPlan]) -> int:
    """The last step whose UNet call needs the structure rows (-1 if none): while the output still equals the
    structure and has no cross-image attention, it is read off the structure; a structure donor and mask capture
    need them too.
    """
    last, out_is_structure = -1, True
    for i, step in enumerate(plan):
        if (out_is_structure and not step.attention_levels) or step.capture:
            last = i
        if step.attention_levels and step.donor == "structure":
            last = i
        out_is_structure = out_is_structure and not (step.attention_levels or step.adain)
    return last


def row_groups_per_step(plan: list[StepPlan], every_branch: bool) -> list[tuple[str, ...]]:
    """The row groups each step's UNet call holds, in batch order.

    The reference runs two full passes of ``[OUT, APP, STRUCT]`` per step. A row's prediction involves only its own
    image or the donor's keys and values, so one call holding only the rows a step needs gives the same numbers: the
    output is not computed while it still equals the structure (before its first cross-image attention or AdaIN),
    the plain pass only at guided steps, and the structure not after its last use.

    Args:
        every_branch: Compute every branch at every step (a callback sees them all, or reconstructions are asked).
    """
    structure_until = len(plan) - 1 if every_branch else structure_last_use(plan)
    out_differs = every_branch
    groups = []
    for i, step in enumerate(plan):
        present = {
            "out": out_differs or bool(step.attention_levels),
            "out_plain": step.guidance_scale is not None,
            "appearance": True,
            "structure": i <= structure_until,
        }
        groups.append(tuple(name for name in ROW_GROUPS if present[name]))
        out_differs = out_differs or bool(step.attention_levels) or step.adain
    return groups


def cross_image_edits(step: StepPlan, layers: CrossImageLayers, groups, contrast_strength: float) -> dict:
    """The step's edits per layer: the output takes the donor's keys and values, with contrasted maps."""
    if "out" not in groups:
        return {}
    edit = KeyValueInjection(receiver="out", donor=step.donor, contrast=contrast_strength)
    return {name: [edit] for name, level in layers.levels.items() if level in step.attention_levels}


def segmentation_captures(step: StepPlan, layers: CrossImageLayers) -> dict:
    """The maps self-segmentation reads, of the appearance and the structure rows, at the capture step."""
    if not step.capture:
        return {}
    rows = ("appearance", "structure")
    return {layers.capture_self: MapCapture("self", rows), layers.capture_cross: MapCapture("cross", rows)}
