"""Unit tests of `attention_processors.py`: layer selection, contrasted attention, the processor and its context."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from tiny_models import TINY_SD

from cross_image_attention.attention_processors import (
    CrossImageAttentionController,
    CrossImageAttnProcessor,
    contrasted_attention,
    cross_image_attention,
    head_averaged_probabilities,
    select_cross_image_layers,
)


def _sd15_shaped_unet(**overrides):
    """SD 1.5's block structure (default block types, layers_per_block=2) with tiny channels."""
    config = {
        "block_out_channels": (32, 32, 64, 64),
        "norm_num_groups": 8,
        "cross_attention_dim": 16,
        "attention_head_dim": 2,
        "layers_per_block": 2,
        "sample_size": 16,
    }
    config.update(overrides)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module")
def sd15_shaped_unet():
    unet = _sd15_shaped_unet()
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet.config.up_block_types == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    return unet


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_SD / "unet")).eval()


def _attn1(block, attention):
    return f"up_blocks.{block}.attentions.{attention}.transformer_blocks.0.attn1.processor"


def _attn2(block, attention):
    return f"up_blocks.{block}.attentions.{attention}.transformer_blocks.0.attn2.processor"


# ---------------------------------------------------------------------------------------------------------------
# Layer selection
# ---------------------------------------------------------------------------------------------------------------


def test_select_layers_on_sd15_structure(sd15_shaped_unet):
    layers = select_cross_image_layers(sd15_shaped_unet)
    expected = {_attn1(3, i): 0 for i in range(3)}
    expected.update({_attn1(2, i): 1 for i in range(3)})
    assert layers.self_attention_levels == expected
    assert layers.capture_self_attention == _attn1(3, 2)
    assert layers.capture_cross_attention == _attn2(2, 2)
    # The names are real processor names of the UNet.
    processors = sd15_shaped_unet.attn_processors
    assert set(expected) | {layers.capture_cross_attention} <= set(processors)


def test_select_layers_on_tiny_unet(tiny_unet):
    layers = select_cross_image_layers(tiny_unet)
    assert layers.self_attention_levels == {_attn1(3, 0): 0, _attn1(3, 1): 0, _attn1(2, 0): 1, _attn1(2, 1): 1}
    assert layers.capture_self_attention == _attn1(3, 1)
    assert layers.capture_cross_attention == _attn2(2, 1)


def test_select_layers_skips_attention_free_high_resolution_blocks():
    # The highest-resolution up block has no attention: the two attention-bearing levels below it are used.
    unet = _sd15_shaped_unet(
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        layers_per_block=1,
    )
    layers = select_cross_image_layers(unet)
    assert layers.self_attention_levels == {_attn1(2, 0): 0, _attn1(2, 1): 0, _attn1(1, 0): 1, _attn1(1, 1): 1}
    assert layers.capture_self_attention == _attn1(2, 1)
    assert layers.capture_cross_attention == _attn2(1, 1)


def test_select_layers_without_decoder_attention_raises():
    blocks = torch.nn.ModuleList([torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1)])
    with pytest.raises(ValueError, match="no attention"):
        select_cross_image_layers(SimpleNamespace(up_blocks=blocks))


# ---------------------------------------------------------------------------------------------------------------
# Contrasted attention and head-averaged probabilities
# ---------------------------------------------------------------------------------------------------------------


def _qkv(batch=2, heads=3, queries=7, keys=5, dim=4, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, queries, dim, generator=generator) * scale
    key = torch.randn(batch, heads, keys, dim, generator=generator) * scale
    value = torch.randn(batch, heads, keys, dim, generator=generator)
    return query, key, value


def _direct_probabilities(query, key):
    return (query.double() @ key.double().transpose(-2, -1) / math.sqrt(query.shape[-1])).softmax(-1)


def _direct_contrast(query, key, value, beta):
    probabilities = _direct_probabilities(query, key)
    mean = probabilities.mean(-1, keepdim=True)
    probabilities = ((probabilities - mean) * beta + mean).clip(0, 1)
    return (probabilities @ value.double()).float()


@pytest.mark.parametrize("beta", [1.67, 3.0, 0.5])
def test_contrasted_attention_matches_direct_computation(beta):
    query, key, value = _qkv()
    out = contrasted_attention(query, key, value, beta, chunk_size=1024)
    assert out.shape == query.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _direct_contrast(query, key, value, beta), atol=1e-5, rtol=1e-5)


def test_contrasted_attention_is_chunk_size_independent():
    query, key, value = _qkv(queries=11, seed=1)
    full = contrasted_attention(query, key, value, 1.67, chunk_size=1024)
    for chunk in (1, 3, 4, 11):
        torch.testing.assert_close(
            contrasted_attention(query, key, value, 1.67, chunk_size=chunk), full, atol=1e-6, rtol=1e-6
        )


def test_contrasted_attention_beta_one_is_plain_attention():
    query, key, value = _qkv(seed=2)
    out = contrasted_attention(query, key, value, 1.0, chunk_size=2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(query, key, value), atol=1e-5, rtol=1e-5)


def test_contrasted_attention_beta_zero_is_uniform_attention():
    query, key, value = _qkv(seed=3)
    out = contrasted_attention(query, key, value, 0.0, chunk_size=4)
    expected = value.mean(dim=-2, keepdim=True).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_contrasted_attention_clips_without_renormalising():
    # With values of ones the output is each row's sum of contrasted probabilities.
    query, key, _ = _qkv(keys=6, seed=4, scale=3.0)
    value = torch.ones(query.shape[0], query.shape[1], 6, 4)
    out = contrasted_attention(query, key, value, 3.0, chunk_size=1024)
    probabilities = _direct_probabilities(query, key)
    mean = probabilities.mean(-1, keepdim=True)
    contrasted = ((probabilities - mean) * 3.0 + mean).clip(0, 1)
    row_sums = contrasted.sum(-1).float()
    torch.testing.assert_close(out[..., 0], row_sums, atol=1e-5, rtol=1e-5)
    assert (row_sums - 1).abs().max() > 1e-2, "the test needs rows whose clipped sum is not 1"
    assert (contrasted == 0).any()


def test_contrasted_attention_keeps_half_precision_dtype():
    query, key, value = (t.to(torch.bfloat16) for t in _qkv(seed=5))
    out = contrasted_attention(query, key, value, 1.67, chunk_size=3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _direct_contrast(query, key, value, 1.67), atol=3e-2, rtol=3e-2)


def test_head_averaged_probabilities():
    query, key, _ = _qkv(queries=9, keys=6, seed=6)
    maps = head_averaged_probabilities(query, key, chunk_size=1024)
    assert maps.shape == (2, 9, 6) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, _direct_probabilities(query, key).mean(1).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 9), atol=1e-6, rtol=0)
    for chunk in (1, 2, 4):
        torch.testing.assert_close(
            head_averaged_probabilities(query, key, chunk_size=chunk), maps, atol=1e-7, rtol=1e-6
        )


# ---------------------------------------------------------------------------------------------------------------
# The processor on a single Attention module
# ---------------------------------------------------------------------------------------------------------------

HEADS, DIM_HEAD, QUERY_DIM, TOKENS = 2, 8, 16, 10


@pytest.fixture(scope="module")
def attention_module():
    torch.manual_seed(1)
    return Attention(query_dim=QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD).eval()


def _hidden(batch, seed=7):
    return torch.randn(batch, TOKENS, QUERY_DIM, generator=torch.Generator().manual_seed(seed))


def _run(attn, processor, hidden_states):
    previous = attn.processor
    attn.set_processor(processor)
    try:
        with torch.no_grad():
            return attn(hidden_states)
    finally:
        attn.set_processor(previous)


def _split(tensor):
    batch, tokens, inner = tensor.shape
    return tensor.view(batch, tokens, HEADS, inner // HEADS).transpose(1, 2)


def _expected_mixed_row(attn, hidden_states, out_row, donor_row, beta):
    """Output row `out_row` attending, with contrast, to the keys and values of `donor_row`."""
    with torch.no_grad():
        query = _split(attn.to_q(hidden_states[out_row : out_row + 1]))
        key = _split(attn.to_k(hidden_states[donor_row : donor_row + 1]))
        value = _split(attn.to_v(hidden_states[donor_row : donor_row + 1]))
        mixed = _direct_contrast(query, key, value, beta).transpose(1, 2).reshape(1, TOKENS, HEADS * DIM_HEAD)
        return attn.to_out[1](attn.to_out[0](mixed))


def test_processor_without_mixing_equals_default_processor(attention_module):
    hidden_states = _hidden(3)
    expected = _run(attention_module, AttnProcessor2_0(), hidden_states)
    for level, mixing_levels in ((None, frozenset()), (0, frozenset()), (1, frozenset({0}))):
        controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.67, mixing_levels=mixing_levels)
        out = _run(attention_module, CrossImageAttnProcessor(controller, level=level), hidden_states)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_processor_without_mixing_equals_default_processor_on_spatial_input():
    torch.manual_seed(2)
    attn = Attention(
        query_dim=8, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0
    ).eval()
    hidden_states = torch.randn(3, 8, 3, 4, generator=torch.Generator().manual_seed(8))
    expected = _run(attn, AttnProcessor2_0(), hidden_states)
    controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.67)
    out = _run(attn, CrossImageAttnProcessor(controller, level=0), hidden_states)
    assert out.shape == hidden_states.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_structure_kv", [False, True])
def test_processor_mixing_one_pair(attention_module, use_structure_kv):
    hidden_states = _hidden(3, seed=9)  # [OUT, APP, STRUCT]
    plain = _run(attention_module, AttnProcessor2_0(), hidden_states)
    controller = CrossImageAttentionController(
        num_pairs=1,
        contrast_strength=1.67,
        query_chunk_size=3,
        mixing_levels=frozenset({0}),
        use_structure_kv=use_structure_kv,
    )
    out = _run(attention_module, CrossImageAttnProcessor(controller, level=0), hidden_states)
    donor = 2 if use_structure_kv else 1
    expected_out = _expected_mixed_row(attention_module, hidden_states, 0, donor, 1.67)
    torch.testing.assert_close(out[0:1], expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], plain[1:], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out[0], plain[0], atol=1e-3)


@pytest.mark.parametrize("use_structure_kv", [False, True])
def test_processor_mixing_two_pairs_layout(attention_module, use_structure_kv):
    hidden_states = _hidden(6, seed=10)  # [OUT0, OUT1, APP0, APP1, STRUCT0, STRUCT1]
    plain = _run(attention_module, AttnProcessor2_0(), hidden_states)
    controller = CrossImageAttentionController(
        num_pairs=2, contrast_strength=2.0, mixing_levels=frozenset({1}), use_structure_kv=use_structure_kv
    )
    out = _run(attention_module, CrossImageAttnProcessor(controller, level=1), hidden_states)
    for pair in range(2):
        donor = (4 if use_structure_kv else 2) + pair
        expected = _expected_mixed_row(attention_module, hidden_states, pair, donor, 2.0)
        torch.testing.assert_close(out[pair : pair + 1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], plain[2:], atol=1e-6, rtol=1e-5)


def test_processor_mixing_with_beta_one_and_identical_rows_reproduces_the_donor(attention_module):
    app = _hidden(1, seed=11)
    hidden_states = torch.cat([app, app, _hidden(1, seed=12)])
    controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.0, mixing_levels=frozenset({0}))
    out = _run(attention_module, CrossImageAttnProcessor(controller, level=0), hidden_states)
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixing_levels", [frozenset(), frozenset({0})])
def test_processor_capture_stores_head_averaged_maps_of_app_and_struct(attention_module, mixing_levels):
    hidden_states = _hidden(6, seed=13)
    controller = CrossImageAttentionController(
        num_pairs=2, contrast_strength=1.67, query_chunk_size=4, mixing_levels=mixing_levels, capture=True
    )
    _run(attention_module, CrossImageAttnProcessor(controller, level=0, capture_as="self"), hidden_states)
    captured = controller.captured["self"]
    assert captured.shape == (4, TOKENS, TOKENS)
    with torch.no_grad():
        rows = hidden_states[2:]
        expected = _direct_probabilities(_split(attention_module.to_q(rows)), _split(attention_module.to_k(rows)))
    torch.testing.assert_close(captured, expected.mean(1).float(), atol=1e-6, rtol=1e-5)


def test_processor_does_not_capture_when_capture_is_off(attention_module):
    controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.67, capture=False)
    _run(attention_module, CrossImageAttnProcessor(controller, level=0, capture_as="self"), _hidden(3))
    assert controller.captured == {}


# ---------------------------------------------------------------------------------------------------------------
# The context manager on UNets
# ---------------------------------------------------------------------------------------------------------------


def test_context_installs_processors_and_restores_them(sd15_shaped_unet):
    original = sd15_shaped_unet.attn_processors
    controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.67)
    with cross_image_attention(sd15_shaped_unet, controller) as layers:
        inside = sd15_shaped_unet.attn_processors
        touched = set(layers.self_attention_levels) | {layers.capture_cross_attention}
        assert len(touched) == 7
        for name, processor in inside.items():
            if name in touched:
                assert isinstance(processor, CrossImageAttnProcessor)
                assert processor.controller is controller
            else:
                assert processor is original[name]
        for name, level in layers.self_attention_levels.items():
            assert inside[name].level == level
            assert inside[name].capture_as == ("self" if name == _attn1(3, 2) else None)
        assert inside[_attn2(2, 2)].level is None and inside[_attn2(2, 2)].capture_as == "cross"
    after = sd15_shaped_unet.attn_processors
    assert after.keys() == original.keys()
    assert all(after[name] is original[name] for name in original)


def test_context_restores_processors_when_the_body_raises(sd15_shaped_unet):
    original = sd15_shaped_unet.attn_processors
    controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.67)
    with pytest.raises(KeyError):
        with cross_image_attention(sd15_shaped_unet, controller):
            assert isinstance(sd15_shaped_unet.attn_processors[_attn1(3, 0)], CrossImageAttnProcessor)
            raise KeyError("boom")
    after = sd15_shaped_unet.attn_processors
    assert all(after[name] is original[name] for name in original)


def test_context_on_tiny_unet_end_to_end(tiny_unet):
    generator = torch.Generator().manual_seed(14)
    app, struct, other = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    text = torch.randn(1, 6, 32, generator=generator).expand(3, 6, 32)  # one prompt for all rows, as in the pipeline
    timestep = 400

    def forward(sample, controller=None):
        with torch.no_grad():
            if controller is None:
                return tiny_unet(sample, timestep, text).sample
            with cross_image_attention(tiny_unet, controller):
                return tiny_unet(sample, timestep, text).sample

    batch = torch.cat([other, app, struct])
    plain = forward(batch)

    # No mixing: identical to the UNet's own processors; capture stores [2P, N, N] self and [2P, N', T] cross maps.
    controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.67, query_chunk_size=16, capture=True)
    torch.testing.assert_close(forward(batch, controller), plain, atol=1e-5, rtol=1e-5)
    self_maps, cross_maps = controller.captured["self"], controller.captured["cross"]
    assert self_maps.shape == (2, 64, 64)
    assert cross_maps.shape == (2, 16, 6)
    torch.testing.assert_close(self_maps.sum(-1), torch.ones(2, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cross_maps.sum(-1), torch.ones(2, 16), atol=1e-5, rtol=0)

    # Mixing at both levels: APP and STRUCT rows untouched, OUT changed; captured maps do not depend on OUT.
    controller = CrossImageAttentionController(
        num_pairs=1, contrast_strength=1.67, mixing_levels=frozenset({0, 1}), capture=True
    )
    mixed = forward(batch, controller)
    torch.testing.assert_close(mixed[1:], plain[1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], plain[0], atol=1e-4)
    torch.testing.assert_close(controller.captured["self"], self_maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(controller.captured["cross"], cross_maps, atol=1e-6, rtol=1e-5)

    # With beta = 1 and OUT == APP, attending to APP's keys and values reproduces APP's output.
    controller = CrossImageAttentionController(num_pairs=1, contrast_strength=1.0, mixing_levels=frozenset({0, 1}))
    same = forward(torch.cat([app, app, struct]), controller)
    torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=1e-5)
