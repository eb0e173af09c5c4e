"""What runs inside the UNet's `Attention` modules: layer descriptions, kernels, the one processor, install/restore.

- [`list_attention_layers`] describes every attention layer of a UNet (place, block, self or cross, resolution
  level, downsampling factor, forward position); each technique selects its layers from it with a short filter.
- [`ControlledAttnProcessor`] runs the edits an [`AttentionController`] holds for its layer and step. Both edits
  reduce to a row gather before one fused kernel (``F.scaled_dot_product_attention``, or xformers when the user
  enabled it): a key/value injection is ``sdpa(Q_receiver, K_donor, V_donor)``, an attention-map injection is
  ``A_source V_receiver = sdpa(Q_source, K_source, V_receiver)``. Only Cross-Image Attention's contrast and map
  capture materialise probabilities, in float32 chunks of query rows.
- [`controlled_attention`] installs the processor on the selected layers for a ``with`` block and restores the
  user's processors afterwards, also on error.
"""

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, XFormersAttnProcessor
from diffusers.utils import is_xformers_available

from .attention_control import AttentionController, AttentionMapInjection, KeyValueInjection


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of a UNet.

    Args:
        name: Its processor name (a key of ``unet.attn_processors``).
        place: ``"down"``, ``"mid"`` or ``"up"``.
        block: Index of its block within ``down_blocks`` / ``up_blocks`` (0 for the mid block).
        is_self_attention: ``attn1`` (self) rather than ``attn2`` (cross-attention to the text).
        level: Resolution rank among the UNet's attention layers by downsampling factor: 0 for the highest
            resolution that has attention (SD 1.x: 64x64 tokens at 512 px; SDXL: 64x64 at 1024 px), 1 the next.
        downsampling: Factor by which the layer's token grid is smaller than the latent grid (1, 2, 4, ...).
        position: Index in forward order among all attention layers (down, mid, up; attn1 before attn2).
    """

    name: str
    place: str
    block: int
    is_self_attention: bool
    level: int
    downsampling: int
    position: int

    def query_tokens(self, latent_height: int, latent_width: int) -> int:
        """Query tokens of this layer for a latent grid (each stride-2 downsampler rounds up)."""
        height, width = latent_height, latent_width
        for _ in range(int(math.log2(self.downsampling))):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        return height * width


def list_attention_layers(unet) -> list[AttentionLayer]:
    """Every attention layer of a `UNet2DConditionModel` (SD 1.x/2.x, SDXL, tiny ones), in forward order.

    Positions and downsampling factors come from the block structure (downsamplers and upsamplers), never from the
    order of ``unet.attn_processors``, which lists ``up_blocks`` before ``mid_block``.
    """
    blocks, factor = [], 1
    for index, block in enumerate(unet.down_blocks):
        blocks.append(("down", index, block, factor))
        factor *= 2 if getattr(block, "downsamplers", None) else 1
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid", 0, unet.mid_block, factor))
    for index, block in enumerate(unet.up_blocks):
        blocks.append(("up", index, block, factor))
        factor //= 2 if getattr(block, "upsamplers", None) else 1

    found = []
    for place, index, block, downsampling in blocks:
        prefix = "mid_block" if place == "mid" else f"{place}_blocks.{index}"
        for name, module in block.named_modules():  # registration order: attentions[k], then attn1 before attn2
            if isinstance(module, Attention):
                found.append((f"{prefix}.{name}.processor", place, index, not module.is_cross_attention, downsampling))
    factors = sorted({downsampling for *_, downsampling in found})
    return [
        AttentionLayer(name, place, index, is_self, factors.index(downsampling), downsampling, position)
        for position, (name, place, index, is_self, downsampling) in enumerate(found)
    ]


# ------------------------------------------------------------------------------------------------------------------
# Kernels on `[B, heads, tokens, head_dim]`
# ------------------------------------------------------------------------------------------------------------------


def chunked_probabilities(query: torch.Tensor, key: torch.Tensor, chunk_size: int) -> Iterator:
    """Yield ``(rows, probabilities)`` chunks of ``softmax(Q K^T / sqrt(d))`` in float32."""
    key_t = key.float().transpose(-2, -1)
    scale = math.sqrt(query.shape[-1])
    for start in range(0, query.shape[-2], chunk_size):
        rows = slice(start, start + chunk_size)
        # In-place division: these chunks are the largest tensors of the call, and fewer temporaries halve the time.
        scores = (query[..., rows, :].float() @ key_t).div_(scale)
        yield rows, scores.softmax(dim=-1)


def contrasted_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, contrast: float, chunk_size: int
) -> torch.Tensor:
    """Attention with Cross-Image Attention's contrasted maps ``clip((A - m) * contrast + m, 0, 1)``, not
    renormalised.

    ``m`` is the mean over keys. The reference takes ``A.mean(-1)`` and broadcasts it along the key axis, so entry
    ``(q, k)`` uses the mean of row ``k``; every softmax row sums to one, so all those means are ``1 / N_keys`` up to
    rounding, and the row's own mean (available chunk by chunk) gives the same map to about 1e-8.
    """
    output = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    value = value.float()
    for rows, probabilities in chunked_probabilities(query, key, chunk_size):
        mean = probabilities.mean(dim=-1, keepdim=True)
        probabilities.sub_(mean).mul_(contrast).add_(mean).clamp_(0.0, 1.0)
        output[..., rows, :] = probabilities @ value
    return output.to(query.dtype)


def head_averaged_probabilities(query: torch.Tensor, key: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d))`` averaged over heads, `[B, queries, keys]` in float32."""
    batch, _, tokens, _ = query.shape
    maps = torch.empty((batch, tokens, key.shape[-2]), dtype=torch.float32, device=query.device)
    for rows, probabilities in chunked_probabilities(query, key, chunk_size):
        maps[:, rows] = probabilities.mean(dim=1)
    return maps


def fused_attention(query, key, value, attention_mask=None, use_xformers: bool = False) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` on a fused kernel, never materialising the probabilities."""
    if use_xformers:
        import xformers.ops

        output = xformers.ops.memory_efficient_attention(
            *(t.transpose(1, 2).contiguous() for t in (query, key, value)), attn_bias=attention_mask
        )
        return output.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)


def injection_indices(edits, row_groups, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which batch row each row takes its queries, keys and values from: the identity, changed by the edits.

    A key/value injection points the receiver's keys and values at the donor; an attention-map injection points
    the receiver's queries and keys at the source (the receiver keeps its values).
    """
    indices = {part: torch.arange(batch_size, device=device) for part in ("query", "key", "value")}
    for edit in edits:
        if isinstance(edit, KeyValueInjection):
            giver, parts = edit.donor, ("key", "value")
        elif isinstance(edit, AttentionMapInjection):
            giver, parts = edit.source, ("query", "key")
        else:
            raise TypeError(f"Unknown attention edit {edit!r}.")
        receiver, giver = row_groups.rows(edit.receiver), row_groups.rows(giver)
        for part in parts:  # a one-row giving group serves every receiver row
            indices[part][receiver] = indices[part][giver].expand(receiver.stop - receiver.start)
    return indices["query"], indices["key"], indices["value"]


# ------------------------------------------------------------------------------------------------------------------
# The processor
# ------------------------------------------------------------------------------------------------------------------


class ControlledAttnProcessor:
    """Attention processor of a controlled layer: the edits and captures its controller holds for it this step.

    Args:
        controller (`AttentionController`): The call's shared state.
        name (`str`): This layer's processor name, the key of its edits and captures in the controller.
        use_xformers (`bool`): Run fused attention with xformers instead of ``F.scaled_dot_product_attention``.
    """

    def __init__(self, controller: AttentionController, name: str, use_xformers: bool = False):
        self.controller, self.name, self.use_xformers = controller, name, use_xformers

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # [B, C, H, W] -> [B, H*W, C]
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        # [B, tokens, heads * d] -> [B, heads, tokens, d]
        query, key, value = (
            projection(states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            for projection, states in (
                (attn.to_q, hidden_states),
                (attn.to_k, encoder_hidden_states),
                (attn.to_v, encoder_hidden_states),
            )
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:  # [B, heads, 1 or queries, keys]
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[-2], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        controller, groups = self.controller, self.controller.row_groups
        edits = controller.edits.get(self.name, ()) if groups is not None else ()
        contrasted = [e for e in edits if isinstance(e, KeyValueInjection) and e.contrast != 1.0]
        if edits:
            q_index, kv_index, v_index = injection_indices(edits, groups, batch_size, query.device)
            query, key, value = query[q_index], key[kv_index], value[v_index]
            if attention_mask is not None:
                attention_mask = attention_mask[kv_index]
        request = controller.capture.get(self.name) if groups is not None else None
        if request is not None:
            batch_rows = torch.arange(batch_size, device=query.device)
            rows = torch.cat([batch_rows[groups.rows(name)] for name in request.groups])
            controller.record(
                request.key, head_averaged_probabilities(query[rows], key[rows], controller.query_chunk_size)
            )

        if contrasted:  # contrasted rows need explicit probabilities; every other row runs fused
            hidden_states = torch.empty_like(query)
            plain = torch.ones(batch_size, dtype=torch.bool, device=query.device)
            for edit in contrasted:
                rows = groups.rows(edit.receiver)
                plain[rows] = False
                hidden_states[rows] = contrasted_attention(
                    query[rows], key[rows], value[rows], edit.contrast, controller.query_chunk_size
                )
            if plain.any():
                mask = attention_mask[plain] if attention_mask is not None else None
                hidden_states[plain] = fused_attention(query[plain], key[plain], value[plain], mask, self.use_xformers)
        else:
            hidden_states = fused_attention(query, key, value, attention_mask, self.use_xformers)

        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)  # [B, tokens, heads * d]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def user_enabled_xformers(processors: dict[str, object], device: torch.device) -> bool:
    """Whether the user switched the UNet to xformers and it can run here (installed, on CUDA)."""
    uses_xformers = any(isinstance(p, XFormersAttnProcessor) for p in processors.values())
    return uses_xformers and is_xformers_available() and device.type == "cuda"


@contextmanager
def controlled_attention(
    unet, controller: AttentionController, layer_names: Iterable[str], device: torch.device | None = None
) -> Iterator[None]:
    """Install [`ControlledAttnProcessor`] on ``layer_names`` for the ``with`` block.

    Every other layer keeps the processor the user chose (SDPA, xformers, sliced, IP-Adapter...). The original
    processors are restored on exit, also when the block raises.

    Args:
        unet: The `UNet2DConditionModel`.
        controller: The call's shared state.
        layer_names: Processor names (keys of ``unet.attn_processors``) of the controlled layers.
        device: Where the UNet will run (under model offloading it may still sit on the CPU when the call starts).
    """
    original = unet.attn_processors
    layer_names = list(layer_names)
    unknown = [name for name in layer_names if name not in original]
    if unknown:
        raise ValueError(f"The UNet has no attention layers named {unknown}.")
    use_xformers = user_enabled_xformers(original, torch.device(device or unet.device))
    processors = dict(original)
    for name in layer_names:
        processors[name] = ControlledAttnProcessor(controller, name, use_xformers)
    unet.set_attn_processor(processors)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))
