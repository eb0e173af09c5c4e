"""Self-segmentation masks for masked AdaIN (the reference borrows it from Prompt Mixing).

The rows of the head-averaged self-attention of the decoder's highest-resolution level are clustered with k-means;
each cluster is scored against the object noun's cross-attention map from the next level; clusters that score well
above the others form the object mask. The reference clusters with scikit-learn's ``KMeans(n_clusters=5,
n_init=10)`` after seeding numpy with 1; a ``RandomState(1)`` shared by the appearance and then the structure image
reproduces the same random stream without touching numpy's global state.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

NUM_SEGMENTS = 5
OBJECT_SCORE_RATIO = 1.4
KMEANS_SEED = 1


def noun_token_positions(tokenizer, prompt: str, noun: str) -> list[list[int]]:
    """Token positions (in the padded prompt, BOS at 0) of every occurrence of ``noun`` in ``prompt``.

    The reference tags parts of speech with nltk and takes token index = word index + 1, which is right when every
    word is one CLIP token (as in ``"A photo of a {domain_name}"``). Matching the noun's own token ids also handles
    words split into several tokens; each occurrence is a list of its token positions.
    """
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    noun_ids = tokenizer(noun, add_special_tokens=False).input_ids
    if not noun_ids:
        return []
    length = len(noun_ids)
    return [
        list(range(start, start + length))
        for start in range(len(prompt_ids) - length + 1)
        if prompt_ids[start : start + length] == noun_ids
    ]


def cluster_attention_rows(self_attention: np.ndarray, random_state: np.random.RandomState) -> np.ndarray:
    """k-means labels (``NUM_SEGMENTS`` clusters, ``n_init=10``) of the rows of a `[N, N]` attention map."""
    return KMeans(n_clusters=NUM_SEGMENTS, n_init=10, random_state=random_state).fit(self_attention).labels_


def normalized_noun_maps(
    cross_attention: np.ndarray, noun_positions: Sequence[Sequence[int]], grid: tuple[int, int], upscale: int
) -> np.ndarray:
    """Per-noun maps `[h, w, nouns]`: the noun's cross-attention, upsampled by repetition and normalised as the
    reference does, ``(map - |min|) / max``.

    Args:
        cross_attention: `[h / upscale * w / upscale, tokens]` head-averaged cross-attention probabilities.
        noun_positions: For each noun occurrence, its token positions (their maps are averaged).
        grid: `(h, w)` of the clusters.
        upscale: Ratio of the cluster grid to the cross-attention grid.
    """
    low_h, low_w = grid[0] // upscale, grid[1] // upscale
    maps = cross_attention.reshape(low_h, low_w, -1)
    normalized = []
    for positions in noun_positions:
        noun_map = maps[:, :, list(positions)].mean(axis=-1).repeat(upscale, axis=0).repeat(upscale, axis=1)
        normalized.append((noun_map - np.abs(noun_map.min())) / noun_map.max())
    return np.stack(normalized, axis=-1)


def object_clusters(labels: np.ndarray, noun_maps: np.ndarray) -> list[int]:
    """Clusters whose best noun score exceeds ``OBJECT_SCORE_RATIO`` times the mean of the other clusters' scores.

    A cluster's score for a noun is the mean of the noun's map inside the cluster; "the others" are all scores with
    one occurrence of the maximum removed, as in the reference.
    """
    scores = []
    for cluster in range(NUM_SEGMENTS):
        inside = labels == cluster
        count = inside.sum()
        scores.append(
            max(float(noun_maps[inside, n].sum() / count) if count else 0.0 for n in range(noun_maps.shape[-1]))
        )
    others = list(scores)
    others.remove(max(others))
    threshold = OBJECT_SCORE_RATIO * (sum(others) / len(others))
    return [cluster for cluster, score in enumerate(scores) if score > threshold]


def self_segmentation_masks(
    self_attention: torch.Tensor,
    cross_attention: torch.Tensor,
    noun_positions: Sequence[Sequence[int]],
    grid: tuple[int, int],
) -> torch.Tensor:
    """Object masks of the appearance and structure images of one pair.

    Args:
        self_attention (`torch.Tensor`): `[2, N, N]` head-averaged self-attention of the appearance and the structure
            image at the decoder's highest-resolution level (`N = h * w`).
        cross_attention (`torch.Tensor`): `[2, N', tokens]` head-averaged cross-attention at the next level.
        noun_positions: Token positions of each occurrence of the object noun.
        grid (`tuple`): `(h, w)` of the highest-resolution level.

    Returns:
        `torch.Tensor`: `[2, h, w]` masks of 0/1 (appearance, structure), float32 on the CPU.
    """
    height, width = grid
    upscale = int(round((height * width / cross_attention.shape[1]) ** 0.5))
    # One stream for the pair, appearance first: the reference seeds numpy's global RNG once before both.
    random_state = np.random.RandomState(KMEANS_SEED)
    masks = []
    for image in range(2):
        labels = cluster_attention_rows(self_attention[image].cpu().numpy(), random_state).reshape(height, width)
        noun_maps = normalized_noun_maps(cross_attention[image].cpu().numpy(), noun_positions, grid, upscale)
        masks.append(np.isin(labels, object_clusters(labels, noun_maps)))
    return torch.from_numpy(np.stack(masks)).float()


def pair_segmentation_masks(
    captured: dict[str, torch.Tensor], noun_positions, latent_grid: tuple[int, int], num_pairs: int
) -> list:
    """Self-segmentation masks for every pair, on the latent grid.

    Args:
        captured: ``"self"``: `[2P, N, N]` and ``"cross"``: `[2P, N', tokens]` head-averaged maps of the appearance
            rows, then the structure rows.
        noun_positions: Per pair, the token positions of its object noun.
        latent_grid: `(h, w)` of the latents; masks made at the attention level's grid are resized to it.

    Returns:
        Per pair, the `[h, w]` masks `(appearance, structure)`.
    """
    # Non-finite latents (e.g. from a callback) give NaN attention; k-means would fail with sklearn's message.
    if not all(torch.isfinite(captured[kind]).all() for kind in ("self", "cross")):
        raise ValueError(
            "Self-segmentation (`use_masked_adain`) got non-finite attention maps: the latents became NaN or "
            "infinite (a `callback_on_step_end` result or too large scales); or pass masks."
        )
    tokens = captured["self"].shape[-1]
    factor = math.sqrt(latent_grid[0] * latent_grid[1] / tokens)
    grid = (round(latent_grid[0] / factor), round(latent_grid[1] / factor))
    pair_masks = []
    for pair in range(num_pairs):
        rows = [pair, num_pairs + pair]
        masks = self_segmentation_masks(captured["self"][rows], captured["cross"][rows], noun_positions[pair], grid)
        if grid != tuple(latent_grid):
            masks = F.interpolate(masks[:, None], size=latent_grid, mode="nearest")[:, 0]
        pair_masks.append((masks[0], masks[1]))
    return pair_masks
