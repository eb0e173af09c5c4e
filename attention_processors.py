"""Cross-image attention: which layers take part, and the attention processor that mixes them.

The denoising batch is laid out as ``[OUT (P), APP (P), STRUCT (P)]`` for ``P`` image pairs. In a mixing call, the
output rows keep their own queries but attend to the keys and values of the appearance rows (or, at some steps, of
the structure rows), and their attention probabilities are contrasted. Everything that does not need explicit
probabilities runs on a fused kernel (``F.scaled_dot_product_attention``, or xformers when the user enabled it);
explicit probabilities are materialised in float32 in chunks of query rows, so their memory does not grow with the
number of query tokens beyond one chunk.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, XFormersAttnProcessor
from diffusers.utils import is_xformers_available

# Level 0 is the decoder's highest-resolution attention level (64x64 tokens for SD 1.5 at 512 px), governed by
# `cross_attn_64_range`; level 1 is the next one (32x32 tokens), governed by `cross_attn_32_range`.
HIGHEST_RESOLUTION_LEVEL = 0
SECOND_RESOLUTION_LEVEL = 1
DEFAULT_QUERY_CHUNK_SIZE = 1024


@dataclass
class CrossImageLayers:
    """The attention layers the method uses, by processor name (the keys of ``unet.attn_processors``).

    Args:
        self_attention_levels: Decoder self-attention layers of the two highest-resolution levels, with their level.
        capture_self_attention: The last self-attention layer of level 0 (source of the segmentation clusters).
        capture_cross_attention: The last cross-attention layer of level 1 (source of the noun maps).
    """

    self_attention_levels: dict[str, int]
    capture_self_attention: str
    capture_cross_attention: str | None


def select_cross_image_layers(unet) -> CrossImageLayers:
    """Find the decoder's two highest-resolution self-attention levels by position and resolution.

    An up block's resolution rank is the number of upsamplers before it; the attention-bearing up blocks with the
    highest rank form level 0 and those with the next rank level 1. On SD 1.5 these are the three ``attn1`` of
    ``up_blocks.3`` and the three of ``up_blocks.2``, the reference's layers at 512 px, and the choice does not
    depend on the image size.
    """
    rank, ranks, layers_by_block = 0, [], []
    for block_index, block in enumerate(unet.up_blocks):
        ranks.append(rank)
        if getattr(block, "upsamplers", None):
            rank += 1
        layers = [
            (f"up_blocks.{block_index}.{name}.processor", module)
            for name, module in block.named_modules()
            if isinstance(module, Attention)
        ]
        layers_by_block.append(layers)
    attention_ranks = sorted({ranks[i] for i, layers in enumerate(layers_by_block) if layers}, reverse=True)
    if not attention_ranks:
        raise ValueError("The UNet's decoder has no attention layers; cross-image attention needs them.")

    levels, capture_self, capture_cross = {}, None, None
    for level, level_rank in enumerate(attention_ranks[:2]):
        for block_index, layers in enumerate(layers_by_block):
            if ranks[block_index] != level_rank:
                continue
            for name, module in layers:
                if module.is_cross_attention:
                    if level == SECOND_RESOLUTION_LEVEL:
                        capture_cross = name
                else:
                    levels[name] = level
                    if level == HIGHEST_RESOLUTION_LEVEL:
                        capture_self = name
    if capture_self is None:
        raise ValueError("The decoder's highest-resolution attention level has no self-attention layer.")
    return CrossImageLayers(levels, capture_self, capture_cross)


@dataclass(frozen=True)
class BatchLayout:
    """Which row groups a denoising UNet call holds, each of ``num_pairs`` rows, in this order: the output in the
    cross-image pass (``out``), the output in the plain pass (``out_plain``, for appearance guidance), the appearance
    (always) and the structure.

    The reference runs two full passes of ``[OUT, APP, STRUCT]``; one call holding only the rows a step needs gives
    the same predictions, since a row's attention involves only its own image or the donor's keys and values.
    """

    num_pairs: int
    out: bool = True
    out_plain: bool = False
    structure: bool = True

    @property
    def groups(self) -> list[str]:
        flags = {"out": self.out, "out_plain": self.out_plain, "appearance": True, "structure": self.structure}
        return [name for name, present in flags.items() if present]

    def rows(self, group: str) -> slice:
        """The batch rows of ``group``, which must be present."""
        index = self.groups.index(group)
        return slice(index * self.num_pairs, (index + 1) * self.num_pairs)


@dataclass
class CrossImageAttentionController:
    """State shared by this project's processors during one pipeline call (set before each UNet call).

    Args:
        num_pairs: ``P``, the number of image pairs in the ``[OUT, APP, STRUCT]`` batch.
        contrast_strength: The contrast factor applied to the output rows' attention probabilities.
        query_chunk_size: Query rows per chunk when probabilities are materialised.
        mixing_levels: Levels where the output rows take another branch's keys and values in this call.
        use_structure_kv: Take the keys and values from the structure rows instead of the appearance rows.
        capture: Record the attention maps that self-segmentation needs during this call.
        captured: ``"self"``: `[2P, N, N]` and ``"cross"``: `[2P, N', 77]` head-averaged probabilities of the
            appearance then structure rows.
        layout: The row groups of the current call; None means the full ``[OUT, APP, STRUCT]`` batch.
    """

    num_pairs: int
    contrast_strength: float
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE
    mixing_levels: frozenset[int] = frozenset()
    use_structure_kv: bool = False
    capture: bool = False
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: BatchLayout | None = None

    @property
    def current_layout(self) -> BatchLayout:
        return self.layout if self.layout is not None else BatchLayout(self.num_pairs)


def _split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = tensor.shape
    return tensor.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def _chunked_probabilities(query: torch.Tensor, key: torch.Tensor, chunk_size: int) -> Iterator:
    """Yield ``(rows, probabilities)`` chunks of ``softmax(Q K^T / sqrt(d))`` in float32, as the reference computes."""
    key_t = key.float().transpose(-2, -1)
    scale = math.sqrt(query.shape[-1])
    for start in range(0, query.shape[-2], chunk_size):
        rows = slice(start, start + chunk_size)
        # In-place division: these chunks are the largest tensors of the call, and fewer temporaries halve the time.
        scores = (query[..., rows, :].float() @ key_t).div_(scale)
        yield rows, scores.softmax(dim=-1)


def contrasted_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, contrast_strength: float, chunk_size: int
) -> torch.Tensor:
    """Attention with contrasted probabilities ``clip((A - m) * beta + m, 0, 1)``, with no renormalisation.

    ``m`` is the mean over keys. The reference takes ``A.mean(-1)`` and broadcasts it along the key axis, so entry
    ``(q, k)`` uses the mean of row ``k``; every softmax row sums to one, so all those means are ``1 / N_keys`` up to
    rounding, and the row's own mean (available chunk by chunk) gives the same map to about 1e-8.

    Args:
        query, key, value (`torch.Tensor`): `[B, heads, tokens, head_dim]`.
    """
    output = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    value = value.float()
    for rows, probabilities in _chunked_probabilities(query, key, chunk_size):
        mean = probabilities.mean(dim=-1, keepdim=True)
        probabilities.sub_(mean).mul_(contrast_strength).add_(mean).clamp_(0.0, 1.0)
        output[..., rows, :] = probabilities @ value
    return output.to(query.dtype)


def head_averaged_probabilities(query: torch.Tensor, key: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d))`` averaged over heads, `[B, queries, keys]` in float32."""
    batch, _, tokens, _ = query.shape
    maps = torch.empty((batch, tokens, key.shape[-2]), dtype=torch.float32, device=query.device)
    for rows, probabilities in _chunked_probabilities(query, key, chunk_size):
        maps[:, rows] = probabilities.mean(dim=1)
    return maps


class CrossImageAttnProcessor:
    """Attention processor for the layers cross-image attention touches (all others keep their processor).

    Args:
        controller (`CrossImageAttentionController`): The call's shared state.
        level (`int`, *optional*): The self-attention level (0 or 1) of this layer, or None for a cross-attention
            layer that is only captured.
        capture_as (`str`, *optional*): ``"self"`` or ``"cross"`` when this layer's maps feed self-segmentation.
        use_xformers (`bool`): Run the fused parts with xformers instead of ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        controller: CrossImageAttentionController,
        level: int | None = None,
        capture_as: str | None = None,
        use_xformers: bool = False,
    ):
        self.controller = controller
        self.level = level
        self.capture_as = capture_as
        self.use_xformers = use_xformers

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        controller = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        num_pairs = controller.num_pairs
        layout = controller.current_layout
        mixing = self.level is not None and self.level in controller.mixing_levels and layout.out
        if mixing:
            # The output rows (always first) keep their queries and take the keys and values of another branch,
            # replaced after the projections (before splitting heads), as in the reference.
            donor = layout.rows("structure" if controller.use_structure_kv else "appearance")
            key = torch.cat([key[donor], key[num_pairs:]])
            value = torch.cat([value[donor], value[num_pairs:]])

        query, key, value = (_split_heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if controller.capture and self.capture_as is not None:
            # Head-averaged maps of the appearance and structure rows (identical in the swap and plain passes).
            rows = slice(layout.rows("appearance").start, layout.rows("structure").stop)
            controller.captured[self.capture_as] = head_averaged_probabilities(
                query[rows], key[rows], controller.query_chunk_size
            )

        if mixing:
            rows = slice(num_pairs, None)
            out_rows = contrasted_attention(
                query[:num_pairs],
                key[:num_pairs],
                value[:num_pairs],
                controller.contrast_strength,
                controller.query_chunk_size,
            )
            other_rows = self._fused_attention(attn, query[rows], key[rows], value[rows], None, batch_size)
            hidden_states = torch.cat([out_rows, other_rows])
        else:
            hidden_states = self._fused_attention(attn, query, key, value, attention_mask, batch_size)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, query.shape[1] * query.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _fused_attention(self, attn, query, key, value, attention_mask, batch_size):
        """Plain attention on a fused kernel; `[B, heads, tokens, head_dim]` in and out."""
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[-2], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if self.use_xformers:
            import xformers.ops

            output = xformers.ops.memory_efficient_attention(
                query.transpose(1, 2).contiguous(),
                key.transpose(1, 2).contiguous(),
                value.transpose(1, 2).contiguous(),
                attn_bias=attention_mask,
            )
            return output.transpose(1, 2)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)


def _user_enabled_xformers(processors: dict[str, object], device: torch.device) -> bool:
    uses_xformers = any(isinstance(p, XFormersAttnProcessor) for p in processors.values())
    return uses_xformers and is_xformers_available() and device.type == "cuda"


@contextmanager
def cross_image_attention(
    unet, controller: CrossImageAttentionController, device: torch.device | None = None
) -> Iterator[CrossImageLayers]:
    """Install this project's processors on the layers the method uses for the ``with`` block.

    Every other layer keeps the processor the user chose (SDPA, xformers, sliced, IP-Adapter...). The original
    processors are restored on exit, also when the block raises.

    Args:
        unet: The `UNet2DConditionModel`.
        controller: The call's shared state.
        device: Where the UNet will run (under model offloading it may still sit on the CPU when the call starts).
    """
    layers = select_cross_image_layers(unet)
    original = unet.attn_processors
    use_xformers = _user_enabled_xformers(original, torch.device(device or unet.device))
    processors = dict(original)
    for name, level in layers.self_attention_levels.items():
        capture_as = "self" if name == layers.capture_self_attention else None
        processors[name] = CrossImageAttnProcessor(controller, level, capture_as, use_xformers)
    if layers.capture_cross_attention is not None:
        processors[layers.capture_cross_attention] = CrossImageAttnProcessor(controller, None, "cross", use_xformers)
    unet.set_attn_processor(processors)
    try:
        yield layers
    finally:
        unet.set_attn_processor(dict(original))
