"""Tests of the attention-control layer: layer descriptions, row groups, the edits against a direct explicit-softmax
computation (float64), the one processor, and installing/restoring it on UNets."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from tiny_models import TINY_SD

from cross_image_attention.attention_control import (
    AttentionController,
    AttentionMapInjection,
    KeyValueInjection,
    MapCapture,
    RowGroups,
)
from cross_image_attention.attention_processors import (
    ControlledAttnProcessor,
    contrasted_attention,
    controlled_attention,
    head_averaged_probabilities,
    list_attention_layers,
)
from cross_image_attention.cross_image_plan import select_cross_image_layers


def _unet(**config):
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


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
    return _unet(**{**config, **overrides})


def _sd2_shaped_unet():
    """SD 2's differences from SD 1.5: heads per level and linear projections."""
    return _sd15_shaped_unet(attention_head_dim=(1, 2, 4, 4), use_linear_projection=True)


def _sdxl_shaped_unet():
    """SDXL's block structure and processor names (140 layers), tiny widths."""
    return _unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        norm_num_groups=8,
        attention_head_dim=(1, 2, 4),
        transformer_layers_per_block=(1, 2, 10),
        layers_per_block=2,
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        sample_size=16,
    )


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


def _attn1(block, attention, place="up"):
    return f"{place}_blocks.{block}.attentions.{attention}.transformer_blocks.0.attn1.processor"


def _attn2(block, attention):
    return f"up_blocks.{block}.attentions.{attention}.transformer_blocks.0.attn2.processor"


# ---------------------------------------------------------------------------------------------------------------
# Layer descriptions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [_sd15_shaped_unet, _sd2_shaped_unet])
def test_layers_of_sd_shaped_unets(build):
    unet = build()
    layers = list_attention_layers(unet)
    assert len(layers) == 32 and {layer.name for layer in layers} == set(unet.attn_processors)
    assert [layer.position for layer in layers] == list(range(32))
    # Forward order: down blocks, then the mid block, then the up blocks; attn1 before attn2.
    assert [layer.place for layer in layers] == ["down"] * 12 + ["mid"] * 2 + ["up"] * 18
    assert [layer.is_self_attention for layer in layers] == [True, False] * 16
    assert layers[0].name == _attn1(0, 0, "down") and layers[12].name.startswith("mid_block.")
    by_name = {layer.name: layer for layer in layers}
    # (downsampling, level, tokens at 512 px = 64x64 latents, tokens at 768 px = 96x96 latents)
    expected = {
        _attn1(0, 0, "down"): (1, 0, 4096, 9216),
        _attn1(1, 1, "down"): (2, 1, 1024, 2304),
        _attn1(2, 0, "down"): (4, 2, 256, 576),
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor": (8, 3, 64, 144),
        _attn1(1, 2): (4, 2, 256, 576),
        _attn1(2, 0): (2, 1, 1024, 2304),
        _attn1(3, 2): (1, 0, 4096, 9216),
    }
    for name, (downsampling, level, tokens_512, tokens_768) in expected.items():
        layer = by_name[name]
        assert (layer.downsampling, layer.level) == (downsampling, level), name
        assert layer.query_tokens(64, 64) == tokens_512 and layer.query_tokens(96, 96) == tokens_768, name
    # Odd latent sides round up at every stride-2 downsampler (as the convolutions do).
    assert by_name[_attn1(1, 0)].query_tokens(66, 62) == 17 * 16


def test_layers_of_sdxl_shaped_unet_follow_the_reference_order():
    unet = _sdxl_shaped_unet()
    layers = list_attention_layers(unet)
    assert len(layers) == 140 and {layer.name for layer in layers} == set(unet.attn_processors)
    # The positions of VSP's fixed SDXL list: up_blocks.0.attentions.2 is 108..127, up_blocks.1 is 128..139.
    assert {layer.position for layer in layers if layer.name.startswith("up_blocks.1.")} == set(range(128, 140))
    assert {layer.position for layer in layers if layer.name.startswith("up_blocks.0.attentions.2.")} == set(
        range(108, 128)
    )
    assert [layer.position for layer in layers if layer.place == "mid"] == list(range(48, 68))
    up_1 = [layer for layer in layers if layer.name.startswith("up_blocks.1.")]
    assert {(layer.downsampling, layer.level) for layer in up_1} == {(2, 0)}
    assert up_1[0].query_tokens(128, 128) == 4096 and up_1[0].query_tokens(16, 16) == 64
    # VSP's default selection: the decoder's highest-resolution level, self-attention only.
    level = min(layer.level for layer in layers if layer.place == "up")
    selected = [
        layer.name for layer in layers if layer.place == "up" and layer.is_self_attention and layer.level == level
    ]
    assert selected == [
        f"up_blocks.1.attentions.{a}.transformer_blocks.{b}.attn1.processor" for a in range(3) for b in range(2)
    ]
    # totoro's slice [108, 140) holds 16 self-attention layers: the last 16 decoder self-attention layers.
    decoder_self = [layer for layer in layers if layer.place == "up" and layer.is_self_attention]
    assert [layer.position for layer in decoder_self[-16:]] == list(range(108, 140, 2))


def test_layers_never_follow_the_processor_dict_order(sd15_shaped_unet):
    # diffusers lists up_blocks before mid_block; forward order puts the mid block first.
    names = list(sd15_shaped_unet.attn_processors)
    assert names.index("mid_block.attentions.0.transformer_blocks.0.attn1.processor") > names.index(_attn1(1, 0))
    positions = {layer.name: layer.position for layer in list_attention_layers(sd15_shaped_unet)}
    assert positions["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] < positions[_attn1(1, 0)]


# ---------------------------------------------------------------------------------------------------------------
# Cross-Image Attention's selection
# ---------------------------------------------------------------------------------------------------------------


def test_select_layers_on_sd15_structure(sd15_shaped_unet):
    layers = select_cross_image_layers(sd15_shaped_unet)
    expected = {_attn1(3, i): 0 for i in range(3)}
    expected.update({_attn1(2, i): 1 for i in range(3)})
    assert layers.levels == expected
    assert layers.capture_self == _attn1(3, 2)
    assert layers.capture_cross == _attn2(2, 2)
    assert set(layers.names) == set(expected) | {_attn2(2, 2)}


def test_select_layers_on_tiny_unet(tiny_unet):
    layers = select_cross_image_layers(tiny_unet)
    assert layers.levels == {_attn1(3, 0): 0, _attn1(3, 1): 0, _attn1(2, 0): 1, _attn1(2, 1): 1}
    assert layers.capture_self == _attn1(3, 1)
    assert layers.capture_cross == _attn2(2, 1)


def test_select_layers_skips_attention_free_high_resolution_blocks():
    # The highest-resolution up block has no attention: the two attention-bearing levels below it are used.
    unet = _sd15_shaped_unet(
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        layers_per_block=1,
    )
    layers = select_cross_image_layers(unet)
    assert layers.levels == {_attn1(2, 0): 0, _attn1(2, 1): 0, _attn1(1, 0): 1, _attn1(1, 1): 1}
    assert layers.capture_self == _attn1(2, 1)
    assert layers.capture_cross == _attn2(1, 1)


def test_select_layers_without_decoder_attention_raises():
    unet = _sd15_shaped_unet(
        down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4, mid_block_type=None
    )
    with pytest.raises(ValueError, match="no self-attention"):
        select_cross_image_layers(unet)


# ---------------------------------------------------------------------------------------------------------------
# Row groups and the controller
# ---------------------------------------------------------------------------------------------------------------


def test_row_groups_rows_stack_and_split():
    rows = RowGroups.of(("uncond/reference", 1), ("uncond/generated", 3), ("cond/reference", 1), ("cond/generated", 3))
    assert rows.names == ["uncond/reference", "uncond/generated", "cond/reference", "cond/generated"]
    assert rows.total == 8
    assert rows.rows("uncond/generated") == slice(1, 4) and rows.rows("cond/reference") == slice(4, 5)
    tensors = {
        name: torch.full((rows.rows(name).stop - rows.rows(name).start, 2), float(i))
        for i, name in enumerate(rows.names)
    }
    tensors["cond/generated"] = torch.full((1, 2), 9.0)  # one row repeated for the group
    batch = rows.stack(tensors)
    assert batch[:, 0].tolist() == [0, 1, 1, 1, 2, 9, 9, 9]
    parts = rows.split(batch)
    assert list(parts) == rows.names and parts["uncond/generated"].shape == (3, 2)
    with pytest.raises(KeyError, match="No row group 'out'"):
        rows.rows("out")
    with pytest.raises(ValueError, match="unique"):
        RowGroups.of(("a", 1), ("a", 2))
    with pytest.raises(ValueError, match="at least one row"):
        RowGroups.of(("a", 0))


def test_controller_checks_edits_and_returns_captures_once():
    rows = RowGroups.of(("source", 1), ("target", 2), ("other", 3))
    controller = AttentionController()
    controller.begin_step(
        rows, {"layer": [AttentionMapInjection("target", "source")]}, {"layer": MapCapture("m", ("source",))}
    )
    with pytest.raises(ValueError, match="not in"):
        controller.begin_step(rows, {"layer": [KeyValueInjection("target", "missing")]})
    with pytest.raises(ValueError, match="one row or as many"):
        controller.begin_step(rows, {"layer": [KeyValueInjection("target", "other")]})
    with pytest.raises(ValueError, match="Capture on layer"):
        controller.begin_step(rows, capture={"layer": MapCapture("m", ("nope",))})
    controller.record("m", torch.ones(1))
    assert list(controller.captured_maps()) == ["m"]
    assert controller.captured_maps() == {}


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
# The processor on a single Attention module, against explicit float64 attention
# ---------------------------------------------------------------------------------------------------------------

HEADS, DIM_HEAD, QUERY_DIM, TOKENS = 2, 8, 16, 10
LAYER = "layer"


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


def _controlled(attn, hidden_states, rows, edits=(), capture=None, chunk=1024):
    controller = AttentionController(query_chunk_size=chunk)
    controller.begin_step(rows, {LAYER: list(edits)}, {LAYER: capture} if capture else {})
    return _run(attn, ControlledAttnProcessor(controller, LAYER), hidden_states), controller


def _heads(attn, projection, rows):
    with torch.no_grad():
        tensor = projection(rows).double()
    return tensor.view(tensor.shape[0], TOKENS, HEADS, DIM_HEAD).transpose(1, 2)


def _explicit(attn, query_rows, key_rows, value_rows, contrast=1.0):
    """Explicit float64 ``softmax(Q K^T / sqrt(d))``, optionally contrasted, times V, then the output projection."""
    query, key, value = (
        _heads(attn, projection, rows)
        for projection, rows in ((attn.to_q, query_rows), (attn.to_k, key_rows), (attn.to_v, value_rows))
    )
    probabilities = (query @ key.transpose(-2, -1) / math.sqrt(DIM_HEAD)).softmax(-1)
    if contrast != 1.0:
        mean = probabilities.mean(-1, keepdim=True)
        probabilities = ((probabilities - mean) * contrast + mean).clip(0, 1)
    out = (probabilities @ value).transpose(1, 2).reshape(query.shape[0], TOKENS, HEADS * DIM_HEAD).float()
    with torch.no_grad():
        return attn.to_out[1](attn.to_out[0](out))


def test_processor_without_edits_equals_default_processor(attention_module):
    hidden_states = _hidden(3)
    expected = _run(attention_module, AttnProcessor2_0(), hidden_states)
    out, _ = _controlled(attention_module, hidden_states, RowGroups.of(("a", 1), ("b", 2)))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # A processor whose controller was never given a step runs plain attention too.
    out = _run(attention_module, ControlledAttnProcessor(AttentionController(), LAYER), hidden_states)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_processor_without_edits_equals_default_processor_on_spatial_input():
    torch.manual_seed(2)
    attn = Attention(
        query_dim=8, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0
    ).eval()
    hidden_states = torch.randn(3, 8, 3, 4, generator=torch.Generator().manual_seed(8))
    expected = _run(attn, AttnProcessor(), hidden_states)
    out, _ = _controlled(attn, hidden_states, RowGroups.of(("a", 3)))
    assert out.shape == hidden_states.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("contrast", [1.0, 1.67])
def test_key_value_injection_matches_explicit_attention(attention_module, contrast):
    # [reference, generated x 2, bystander]: each generated row attends to the one reference row's keys and values.
    hidden_states = _hidden(4, seed=9)
    rows = RowGroups.of(("reference", 1), ("generated", 2), ("bystander", 1))
    out, _ = _controlled(
        attention_module, hidden_states, rows, [KeyValueInjection("generated", "reference", contrast)], chunk=3
    )
    plain = _run(attention_module, AttnProcessor2_0(), hidden_states)
    for row in (1, 2):
        expected = _explicit(
            attention_module, hidden_states[row : row + 1], hidden_states[0:1], hidden_states[0:1], contrast
        )
        torch.testing.assert_close(out[row : row + 1], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[row], plain[row], atol=1e-3)
    torch.testing.assert_close(out[[0, 3]], plain[[0, 3]], atol=1e-6, rtol=1e-5)


def test_key_value_injection_pairs_rows_one_to_one(attention_module):
    # CIA's layout [OUT0, OUT1, APP0, APP1]: output row p takes appearance row p.
    hidden_states = _hidden(4, seed=10)
    rows = RowGroups.of(("out", 2), ("appearance", 2))
    out, _ = _controlled(attention_module, hidden_states, rows, [KeyValueInjection("out", "appearance", 2.0)])
    for pair in range(2):
        donor = hidden_states[2 + pair : 3 + pair]
        expected = _explicit(attention_module, hidden_states[pair : pair + 1], donor, donor, 2.0)
        torch.testing.assert_close(out[pair : pair + 1], expected, atol=1e-5, rtol=1e-5)


def test_attention_map_injection_matches_explicit_attention(attention_module):
    # [uncond/source, uncond/target, cond/source, cond/target x 2]: the conditional targets use the conditional
    # source's maps on their own values; the unconditional rows keep their own attention.
    hidden_states = _hidden(5, seed=11)
    rows = RowGroups.of(("uncond/source", 1), ("uncond/target", 1), ("cond/source", 1), ("cond/target", 2))
    out, _ = _controlled(attention_module, hidden_states, rows, [AttentionMapInjection("cond/target", "cond/source")])
    plain = _run(attention_module, AttnProcessor2_0(), hidden_states)
    source = hidden_states[2:3]
    for row in (3, 4):
        expected = _explicit(attention_module, source, source, hidden_states[row : row + 1])
        torch.testing.assert_close(out[row : row + 1], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[row], plain[row], atol=1e-3)
    torch.testing.assert_close(out[:3], plain[:3], atol=1e-6, rtol=1e-5)


def test_map_injection_with_identical_values_reproduces_the_source(attention_module):
    source = _hidden(1, seed=12)
    rows = RowGroups.of(("source", 1), ("target", 1))
    out, _ = _controlled(
        attention_module, torch.cat([source, source]), rows, [AttentionMapInjection("target", "source")]
    )
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-5)


def test_capture_records_head_averaged_maps_of_the_named_groups(attention_module):
    hidden_states = _hidden(5, seed=13)
    rows = RowGroups.of(("out", 2), ("appearance", 2), ("structure", 1))
    _, controller = _controlled(
        attention_module,
        hidden_states,
        rows,
        [KeyValueInjection("out", "appearance", 1.67)],
        capture=MapCapture("self", ("appearance", "structure")),
        chunk=4,
    )
    captured = controller.captured_maps()["self"]
    assert captured.shape == (3, TOKENS, TOKENS)
    query, key = (
        _heads(attention_module, attention_module.to_q, hidden_states[2:]),
        _heads(attention_module, attention_module.to_k, hidden_states[2:]),
    )
    expected = (query @ key.transpose(-2, -1) / math.sqrt(DIM_HEAD)).softmax(-1).mean(1).float()
    torch.testing.assert_close(captured, expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Installing the processor on UNets
# ---------------------------------------------------------------------------------------------------------------


def test_context_installs_only_on_the_selected_layers_and_restores_them(sd15_shaped_unet):
    original = sd15_shaped_unet.attn_processors
    names = select_cross_image_layers(sd15_shaped_unet).names
    controller = AttentionController()
    with controlled_attention(sd15_shaped_unet, controller, names):
        inside = sd15_shaped_unet.attn_processors
        for name, processor in inside.items():
            if name in names:
                assert isinstance(processor, ControlledAttnProcessor)
                assert processor.controller is controller and processor.name == name
            else:
                assert processor is original[name]
    after = sd15_shaped_unet.attn_processors
    assert all(after[name] is original[name] for name in original)


def test_context_restores_processors_when_the_body_raises(sd15_shaped_unet):
    original = sd15_shaped_unet.attn_processors
    with pytest.raises(KeyError):
        with controlled_attention(sd15_shaped_unet, AttentionController(), [_attn1(3, 0)]):
            assert isinstance(sd15_shaped_unet.attn_processors[_attn1(3, 0)], ControlledAttnProcessor)
            raise KeyError("boom")
    after = sd15_shaped_unet.attn_processors
    assert all(after[name] is original[name] for name in original)


def test_context_rejects_unknown_layer_names(sd15_shaped_unet):
    original = sd15_shaped_unet.attn_processors
    with pytest.raises(ValueError, match="no attention layers named"):
        with controlled_attention(sd15_shaped_unet, AttentionController(), ["up_blocks.9.attn1.processor"]):
            pass
    assert all(sd15_shaped_unet.attn_processors[name] is original[name] for name in original)


def test_context_on_tiny_unet_end_to_end(tiny_unet):
    generator = torch.Generator().manual_seed(14)
    app, struct, other = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    text = torch.randn(1, 6, 32, generator=generator).expand(3, 6, 32)  # one prompt for all rows, as in the pipeline
    layers = select_cross_image_layers(tiny_unet)
    rows = RowGroups.of(("out", 1), ("appearance", 1), ("structure", 1))
    captures = {
        layers.capture_self: MapCapture("self", ("appearance", "structure")),
        layers.capture_cross: MapCapture("cross", ("appearance", "structure")),
    }

    def forward(sample, edits=None):
        controller = AttentionController(query_chunk_size=16)
        controller.begin_step(rows, {name: edits for name in layers.levels} if edits else {}, captures)
        with torch.no_grad(), controlled_attention(tiny_unet, controller, layers.names):
            return tiny_unet(sample, 400, text).sample, controller.captured_maps()

    batch = torch.cat([other, app, struct])
    with torch.no_grad():
        plain = tiny_unet(batch, 400, text).sample

    # No edits: identical to the UNet's own processors; capture gives [2, N, N] self and [2, N', T] cross maps.
    out, captured = forward(batch)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    assert captured["self"].shape == (2, 64, 64) and captured["cross"].shape == (2, 16, 6)
    torch.testing.assert_close(captured["self"].sum(-1), torch.ones(2, 64), atol=1e-5, rtol=0)

    # Cross-image attention at both levels: APP and STRUCT rows untouched, OUT changed, captures unchanged.
    edited, edited_captured = forward(batch, [KeyValueInjection("out", "appearance", 1.67)])
    torch.testing.assert_close(edited[1:], plain[1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited[0], plain[0], atol=1e-4)
    torch.testing.assert_close(edited_captured["self"], captured["self"], atol=1e-6, rtol=1e-5)

    # Without contrast and with OUT == APP, attending to APP's keys and values reproduces APP's output.
    same, _ = forward(torch.cat([app, app, struct]), [KeyValueInjection("out", "appearance")])
    torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=1e-5)
