"""The metrics against direct computations on tiny random DINO and CLIP models built from configs (no download)."""

import math
import urllib.error
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, ViTConfig, ViTModel

from cross_image_attention import metrics

DATA = Path(__file__).parent / "data"
IMAGENET = (torch.tensor(metrics.IMAGENET_MEAN)[:, None, None], torch.tensor(metrics.IMAGENET_STD)[:, None, None])
CLIP_NORM = (torch.tensor(metrics.CLIP_MEAN)[:, None, None], torch.tensor(metrics.CLIP_STD)[:, None, None])
# With seed 0 the tiny CLIP model finds "a dog" closer to the test photos than to nothing (positive cosine) and
# "a photo of a cat" farther (negative): both sides of CLIP score's max(cos, 0).
POSITIVE_PROMPT, NEGATIVE_PROMPT = "a dog", "a photo of a cat"


def build_dino() -> ViTModel:
    """A 2-block DINO-like ViT with patch 8 at 32 x 32 pixels (16 patches and CLS)."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def build_clip():
    """A tiny CLIP model at 32 x 32 pixels, with the text side and tokenizer of the fixture's tiny SD model."""
    torch.manual_seed(0)
    text = CLIPTextConfig.from_pretrained(DATA / "tiny_sd" / "text_encoder")
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    return CLIPModel(config).eval(), AutoTokenizer.from_pretrained(DATA / "tiny_sd" / "tokenizer")


def build_lpips(net: str = "squeeze") -> metrics.LPIPS:
    """LPIPS with random backbone and heads (the heads positive, as trained ones are)."""
    torch.manual_seed(0)
    model = metrics.LPIPS(net)
    with torch.no_grad():
        for head in model.heads:
            head.weight.uniform_(0, 0.1)
    return model


def build_models(batch_size: int = 16) -> metrics.MetricModels:
    clip, tokenizer = build_clip()
    return metrics.MetricModels(
        dino_model=build_dino(),
        clip_model=clip,
        clip_tokenizer=tokenizer,
        lpips_net=build_lpips(),
        device="cpu",
        batch_size=batch_size,
    )


def photo(name: str, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    """A fixture photo resized to `size` = (width, height)."""
    return PIL.Image.open(DATA / "parity" / f"{name}.png").convert("RGB").resize(size, PIL.Image.Resampling.BICUBIC)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and on shared cores waiting threads cost time: one thread here,
    restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return build_models()


@pytest.fixture(scope="module")
def cat():
    return photo("chelsea")


@pytest.fixture(scope="module")
def astronaut():
    return photo("astronaut")


def as_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def bicubic(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(tensor[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


def keys_self_similarity(dino: ViTModel, image: torch.Tensor) -> torch.Tensor:
    """The last block's keys computed from its input hidden state (no hook), their cosine self-similarity."""
    pixels = (bicubic(image, (32, 32)) - IMAGENET[0]) / IMAGENET[1]
    with torch.no_grad():
        hidden = dino(pixel_values=pixels[None], output_hidden_states=True).hidden_states[-2]
        last = dino.layers[-1]
        keys = last.attention.k_proj(last.layernorm_before(hidden))[0]
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return keys @ keys.T


def cls_token(dino: ViTModel, image: torch.Tensor) -> torch.Tensor:
    pixels = (bicubic(image, (32, 32)) - IMAGENET[0]) / IMAGENET[1]
    with torch.no_grad():
        return dino(pixel_values=pixels[None]).last_hidden_state[0, 0]


# Structure distance ---------------------------------------------------------------------------------------------


def test_structure_distance_is_the_mse_of_key_self_similarities(models, cat, astronaut):
    first, second = (
        keys_self_similarity(models.dino, as_tensor(cat)),
        keys_self_similarity(models.dino, as_tensor(astronaut)),
    )
    assert first.shape == (17, 17)  # 4 x 4 patches and CLS
    expected = float(((first - second) ** 2).mean())
    assert metrics.structure_distance(cat, astronaut, models) == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01


def test_identical_images_are_at_distance_zero_and_similarity_one(models, cat):
    assert metrics.structure_distance(cat, cat, models) == 0
    assert metrics.dino_similarity(cat, cat, models) == pytest.approx(1, abs=1e-6)
    assert metrics.gram_distance(cat, cat, models) == 0
    small = cat.resize((32, 32))
    assert metrics.lpips_distance(small, small, models) == 0
    assert metrics.mse(cat, cat) == 0
    assert metrics.psnr(cat, cat) == math.inf
    assert metrics.ssim(cat, cat) == pytest.approx(1, abs=1e-12)


def test_a_flip_changes_the_structure_but_hardly_the_cls_token(models, cat, astronaut):
    flipped = cat.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    # A flip moves the layout about as far as another photo does...
    assert metrics.structure_distance(cat, flipped, models) > 0.5 * metrics.structure_distance(cat, astronaut, models)
    # ...while the CLS token, which pools the tokens, stays many times closer than another photo's.
    assert 1 - metrics.dino_similarity(cat, flipped, models) < 0.2 * (
        1 - metrics.dino_similarity(cat, astronaut, models)
    )


def test_splice_resize_keeps_the_aspect_ratio_with_the_long_side_capped():
    assert metrics.splice_size(512, 512, 224) == (224, 224)
    assert metrics.splice_size(480, 640, 224) == (224, 298)
    assert metrics.splice_size(640, 480, 224) == (298, 224)
    assert metrics.splice_size(200, 1000, 224) == (96, 480)  # 1120 would exceed 480


def test_the_output_is_resized_to_the_reference_size(models, cat, astronaut):
    small = astronaut.resize((48, 40), PIL.Image.Resampling.BICUBIC)
    resized = bicubic(as_tensor(small), (64, 64))
    assert metrics.structure_distance(cat, small, models) == pytest.approx(
        metrics.structure_distance(cat, resized, models), abs=1e-7
    )
    # The order decides which image is resized: the other way round the cat is brought to 48 x 40.
    assert metrics.psnr(cat, small) == pytest.approx(metrics.psnr(cat, resized), abs=1e-9)
    assert metrics.psnr(small, cat) == pytest.approx(metrics.psnr(small, bicubic(as_tensor(cat), (40, 48))), abs=1e-9)
    assert metrics.psnr(small, cat) != pytest.approx(metrics.psnr(cat, small), abs=1e-3)


def test_batched_descriptors_equal_one_at_a_time(models, cat, astronaut):
    images = [
        as_tensor(cat),
        as_tensor(astronaut.resize((48, 40))),
        as_tensor(astronaut),
        as_tensor(cat.resize((40, 48))),
    ]
    one, many = (
        metrics.MetricModels(models.dino, models.clip, models.tokenizer, device="cpu", batch_size=size)
        for size in (1, 16)
    )
    for a, b in zip(one.dino_self_similarity(images), many.dino_self_similarity(images)):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(one.dino_cls(images), many.dino_cls(images), atol=1e-5)
    assert torch.allclose(one.clip_image_embeddings(images), many.clip_image_embeddings(images), atol=1e-5)


# DINO-I and Gram ------------------------------------------------------------------------------------------------


def test_dino_similarity_is_the_cosine_of_cls_tokens(models, cat, astronaut):
    first, second = cls_token(models.dino, as_tensor(cat)), cls_token(models.dino, as_tensor(astronaut))
    expected = float(F.cosine_similarity(first, second, dim=0))
    assert metrics.dino_similarity(cat, astronaut, models) == pytest.approx(expected, abs=1e-6)
    assert metrics.dino_similarity(astronaut, cat, models) == pytest.approx(expected, abs=1e-6)


def test_gram_distance_compares_token_gram_matrices(models, cat, astronaut):
    def grams(image):
        pixels = (bicubic(as_tensor(image), (32, 32)) - IMAGENET[0]) / IMAGENET[1]
        with torch.no_grad():
            hidden = models.dino(pixel_values=pixels[None], output_hidden_states=True).hidden_states
        return [hidden[layer][0, 1:].T @ hidden[layer][0, 1:] / 16 for layer in (1, 2)]  # depth 2: blocks 1 and 2

    expected = np.mean([float(((a - b) ** 2).mean()) for a, b in zip(grams(cat), grams(astronaut))])
    assert metrics.gram_distance(cat, astronaut, models) == pytest.approx(expected, rel=1e-5)
    assert metrics.gram_distance(cat, astronaut, models, layers=[2]) == pytest.approx(
        float(((grams(cat)[1] - grams(astronaut)[1]) ** 2).mean()), rel=1e-5
    )
    with pytest.raises(ValueError, match="layers"):
        metrics.gram_distance(cat, astronaut, models, layers=[3])


# CLIP score -----------------------------------------------------------------------------------------------------


def clip_cosine(models, image: PIL.Image.Image, prompt: str) -> float:
    """CLIP preprocessing by hand for a 64 x 48 image: shorter side 32 (width 43), centre crop 32 x 32."""
    clip, tokenizer = models.clip, models.tokenizer
    pixels = bicubic(as_tensor(image), (32, 43))[:, :, 5:37]
    pixels = (pixels - CLIP_NORM[0]) / CLIP_NORM[1]
    tokens = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        image_embedding = clip.visual_projection(clip.vision_model(pixel_values=pixels[None]).pooler_output)[0]
        text_embedding = clip.text_projection(clip.text_model(**tokens).pooler_output)[0]
    return float(F.cosine_similarity(image_embedding, text_embedding, dim=0))


def test_clip_score_is_100_times_the_positive_cosine(models):
    image = photo("chelsea", (64, 48))
    positive, negative = clip_cosine(models, image, POSITIVE_PROMPT), clip_cosine(models, image, NEGATIVE_PROMPT)
    assert positive > 0 > negative
    assert metrics.clip_score(image, POSITIVE_PROMPT, models) == pytest.approx(100 * positive, abs=1e-4)
    assert metrics.clip_score(image, NEGATIVE_PROMPT, models) == 0


def test_clip_score_with_a_mask_scores_the_masked_image(models, cat):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255  # at half the image's size: resized (nearest) to 64 x 64
    masked = as_tensor(cat).clone()
    keep = torch.zeros(64, 64)
    keep[16:48, 8:40] = 1
    masked *= keep
    expected = metrics.clip_score(masked, POSITIVE_PROMPT, models)
    assert metrics.clip_score(cat, POSITIVE_PROMPT, models, mask=mask) == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(metrics.clip_score(cat, POSITIVE_PROMPT, models), abs=1e-3)


def test_clip_score_arguments_are_image_then_prompt(models, cat):
    with pytest.raises(TypeError, match="prompt: expected a string"):
        metrics.clip_score(POSITIVE_PROMPT, cat, models)


# Pixel metrics --------------------------------------------------------------------------------------------------


def naive_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM with explicit loops over the window positions that fit ('valid'), per channel."""
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i : i + 11, j : j + 11], y[c, i : i + 11, j : j + 11]
                ma, mb = (window * a).sum(), (window * b).sum()
                va, vb = (window * a * a).sum() - ma**2, (window * b * b).sum() - mb**2
                cov = (window * a * b).sum() - ma * mb
                c1, c2 = 0.01**2, 0.03**2
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_mse_psnr_and_ssim_against_direct_computations():
    generator = torch.Generator().manual_seed(0)
    first = torch.rand(3, 16, 18, generator=generator)
    second = (first + 0.1 * torch.randn(3, 16, 18, generator=generator)).clamp(0, 1)
    error = float(((first.double() - second.double()) ** 2).mean())
    assert metrics.mse(first, second) == pytest.approx(error, rel=1e-12)
    assert metrics.psnr(first, second) == pytest.approx(10 * math.log10(1 / error), rel=1e-12)
    assert metrics.ssim(first, second) == pytest.approx(naive_ssim(first.double().numpy(), second.double().numpy()))
    # uint8 images (and PIL images) are read as value / 255.
    as_uint8 = (first * 255).round().to(torch.uint8)
    assert metrics.mse(as_uint8, as_uint8.permute(1, 2, 0).numpy()) == 0


def test_ssim_matches_torchmetrics_on_the_valid_window_positions():
    functional = pytest.importorskip("torchmetrics.functional.image")
    generator = torch.Generator().manual_seed(1)
    first = torch.rand(3, 40, 52, generator=generator)
    second = (first + 0.1 * torch.randn(3, 40, 52, generator=generator)).clamp(0, 1)
    # PIE-Bench-era torchmetrics averaged the map without its 5-pixel border; newer releases return the full map.
    _, full = functional.structural_similarity_index_measure(
        second[None], first[None], data_range=1.0, return_full_image=True
    )
    assert metrics.ssim(first, second) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-6)
    psnr = functional.peak_signal_noise_ratio(second[None], first[None], data_range=1.0)
    assert metrics.psnr(first, second) == pytest.approx(float(psnr), abs=1e-4)


def test_outside_mask_metrics_ignore_changes_inside_the_mask(cat, astronaut):
    source = as_tensor(cat)
    edit = source.clone()
    edit[:, 16:48, 16:48] = as_tensor(astronaut)[:, 16:48, 16:48]
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:48, 16:48] = True
    assert metrics.mse(source, edit) > 0
    assert metrics.mse(source, edit, mask=mask) == 0
    assert metrics.psnr(source, edit, mask=mask) == math.inf
    assert metrics.ssim(source, edit, mask=mask) == pytest.approx(1, abs=1e-12)
    # PIE-Bench's protocol: both images times 1 - mask, then the whole-image metric.
    outside = edit.clone()
    outside[:, :4, :] = 0.5
    keep = (~mask).float()
    assert metrics.ssim(source, outside, mask=mask) == pytest.approx(metrics.ssim(source * keep, outside * keep))
    assert metrics.psnr(source, outside, mask=mask) == pytest.approx(metrics.psnr(source * keep, outside * keep))


# LPIPS ----------------------------------------------------------------------------------------------------------


def test_lpips_against_a_direct_computation(models):
    model = models.lpips
    cat, astronaut = photo("chelsea", (32, 32)), photo("astronaut", (32, 32))
    x, y = as_tensor(cat)[None] * 2 - 1, as_tensor(astronaut)[None] * 2 - 1
    shift, scale = (
        torch.tensor([-0.030, -0.088, -0.188])[:, None, None],
        torch.tensor([0.458, 0.448, 0.450])[:, None, None],
    )
    expected, a, b = 0.0, (x - shift) / scale, (y - shift) / scale
    with torch.no_grad():
        for index, layer in enumerate(model.features):
            a, b = layer(a), layer(b)
            if index in (1, 4, 7, 9, 10, 11, 12):  # SqueezeNet 1.1's relu1 ... relu7, as LPIPS taps them
                head = model.heads[(1, 4, 7, 9, 10, 11, 12).index(index)].weight[0, :, 0, 0]
                na = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                nb = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                expected += float((((na - nb) ** 2) * head[:, None, None]).sum(dim=1).mean())
    assert metrics.lpips_distance(cat, astronaut, models) == pytest.approx(expected, rel=1e-5)
    assert metrics.lpips_distance(astronaut, cat, models) == pytest.approx(expected, rel=1e-5)
    mask = np.zeros((32, 32), dtype=bool)
    mask[:, 16:] = True
    keep = torch.ones(3, 32, 32)
    keep[:, :, 16:] = 0
    assert metrics.lpips_distance(cat, astronaut, models, mask=mask) == pytest.approx(
        metrics.lpips_distance(as_tensor(cat) * keep, as_tensor(astronaut) * keep, models), rel=1e-6
    )


# torchvision's parameter names and shapes of a few layers, which its weight files must find.
TORCHVISION_LAYERS = {
    "squeeze": {"0.weight": (64, 3, 3, 3), "3.squeeze.weight": (16, 64, 1, 1), "12.expand3x3.weight": (256, 64, 3, 3)},
    "alex": {"0.weight": (64, 3, 11, 11), "3.weight": (192, 64, 5, 5), "10.weight": (256, 256, 3, 3)},
    "vgg": {"0.weight": (64, 3, 3, 3), "10.weight": (256, 128, 3, 3), "28.weight": (512, 512, 3, 3)},
}


@pytest.mark.parametrize("net", sorted(TORCHVISION_LAYERS))
def test_lpips_pretrained_loads_torchvision_features_and_the_paper_heads(net, monkeypatch):
    pytest.importorskip("torchmetrics")
    torch.manual_seed(0)
    backbone = {
        f"features.{key}": torch.randn_like(value) for key, value in metrics.LPIPS(net).features.state_dict().items()
    }
    for key, shape in TORCHVISION_LAYERS[net].items():
        assert backbone[f"features.{key}"].shape == shape
    # A torchvision file also holds the classifier and, for AlexNet and VGG, a last pooling layer LPIPS does not use.
    checkpoint = {**backbone, "classifier.1.weight": torch.zeros(10, 4)}
    urls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: urls.append(url) or checkpoint)
    model = metrics.LPIPS.pretrained(net)
    assert urls == [metrics.LPIPS_NETS[net][0]]
    for key, value in model.features.state_dict().items():
        assert torch.equal(value, backbone[f"features.{key}"])
    heads = torch.load(metrics._lpips_heads_file(net), map_location="cpu", weights_only=True)
    assert len(heads) == len(model.heads)
    for index, head in enumerate(model.heads):
        assert torch.equal(head.weight, heads[f"lin{index}.model.1.weight"])
        assert (head.weight >= 0).all()  # LPIPS's trained heads are non-negative


def test_lpips_offline_is_one_line(monkeypatch):
    pytest.importorskip("torchmetrics")

    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(OSError, match=r"lpips_net 'squeeze': cannot load torchvision's backbone weights") as error:
        metrics.LPIPS.pretrained("squeeze")
    assert "\n" not in str(error.value)


def test_lpips_without_torchmetrics_says_what_to_install(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'torchmetrics>=1.1' \(the metrics extra\)"):
        metrics.LPIPS.pretrained("alex")


# Bad input and loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        ("cat.png", TypeError, "reference: expected a PIL image, a torch tensor or a numpy array, got str"),
        (torch.rand(4, 8, 8), ValueError, r"reference: expected a tensor of shape \(3, H, W\)"),
        (torch.rand(3, 8, 8) * 2, ValueError, r"reference: expected values in \[0, 1\]"),
        (np.zeros((8, 8)), ValueError, r"reference: expected a numpy array of shape \(H, W, 3\)"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), TypeError, "reference: expected uint8 or floating point values"),
    ],
)
def test_bad_images_name_the_argument(models, cat, image, error, message):
    with pytest.raises(error, match=message):
        metrics.structure_distance(image, cat, models)


def test_other_bad_arguments(models, cat):
    with pytest.raises(TypeError, match="mask: expected a PIL image"):
        metrics.psnr(cat, cat, mask="mask.png")
    with pytest.raises(ValueError, match="SSIM needs sides of at least 11 pixels"):
        metrics.ssim(torch.rand(3, 10, 40), torch.rand(3, 10, 40))
    with pytest.raises(TypeError, match="models: expected a MetricModels object"):
        metrics.dino_similarity(cat, cat, models="facebook/dino-vitb8")
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        metrics.MetricModels(batch_size=0)
    with pytest.raises(ValueError, match="lpips_net: expected one of squeeze, alex, vgg"):
        metrics.MetricModels(lpips_net="resnet")
    with pytest.raises(ValueError, match="clip_tokenizer: needed"):
        metrics.MetricModels(clip_model=build_clip()[0])


def test_models_load_from_folders_and_fail_in_one_line(tmp_path, cat, astronaut):
    dino = build_dino()
    dino.save_pretrained(tmp_path / "dino")
    loaded = metrics.MetricModels(dino_model=str(tmp_path / "dino"), device="cpu")
    assert metrics.structure_distance(cat, astronaut, loaded) == pytest.approx(
        metrics.structure_distance(cat, astronaut, metrics.MetricModels(dino_model=dino, device="cpu")), abs=1e-7
    )
    missing = metrics.MetricModels(dino_model=str(tmp_path / "missing"), clip_model=str(tmp_path / "missing"))
    with pytest.raises(OSError, match=r"dino_model '.*missing': cannot load the model") as error:
        missing.dino  # noqa: B018
    assert "\n" not in str(error.value)
    with pytest.raises(OSError, match=r"clip_model '.*missing': cannot load the model"):
        metrics.clip_score(cat, "a cat", missing)


def test_without_models_a_call_loads_the_default_models(monkeypatch, cat):
    names = []

    def from_pretrained(name, **kwargs):
        names.append(name)
        raise OSError("offline")

    monkeypatch.setattr(ViTModel, "from_pretrained", from_pretrained)
    with pytest.raises(OSError, match="dino_model 'facebook/dino-vitb8': cannot load the model"):
        metrics.structure_distance(cat, cat)
    assert names == ["facebook/dino-vitb8"]
