"""Unit tests of `segmentation.py` on the tiny tokenizer and on synthetic attention maps."""

import numpy as np
import pytest
import torch
from tiny_models import TINY_SD
from transformers import CLIPTokenizer

from cross_image_attention.segmentation import (
    NUM_SEGMENTS,
    OBJECT_SCORE_RATIO,
    normalized_noun_maps,
    noun_token_positions,
    object_clusters,
    self_segmentation_masks,
)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# Noun token positions
# ---------------------------------------------------------------------------------------------------------------


def test_noun_positions_multi_token_word(tokenizer):
    # The tiny tokenizer spells words character by character: <bos> a p h o t o o f a | a n i m a l
    ids = tokenizer("A photo of a animal").input_ids
    assert len(ids) == 17
    assert noun_token_positions(tokenizer, "A photo of a animal", "animal") == [[10, 11, 12, 13, 14, 15]]
    assert tokenizer.convert_ids_to_tokens(ids[10:16]) == ["a", "n", "i", "m", "a", "l</w>"]


def test_noun_positions_absent_word(tokenizer):
    assert noun_token_positions(tokenizer, "A photo of a animal", "dog") == []
    # "cat" ends with the end-of-word token "t</w>", which "cats" does not contain.
    assert noun_token_positions(tokenizer, "A photo of cats", "cat") == []


def test_noun_positions_every_occurrence(tokenizer):
    # <bos> c a t</w> | a n d</w> | a</w> | c a t</w>
    assert noun_token_positions(tokenizer, "cat and a cat", "cat") == [[1, 2, 3], [8, 9, 10]]


def test_noun_positions_case_insensitive(tokenizer):
    assert noun_token_positions(tokenizer, "A photo of a Zebra", "zebra") == [[10, 11, 12, 13, 14]]


# ---------------------------------------------------------------------------------------------------------------
# Noun maps
# ---------------------------------------------------------------------------------------------------------------


def test_normalized_noun_maps_hand_computed():
    # A 2x2 cross-attention grid over 4 tokens, upsampled x2 to a 4x4 cluster grid.
    cross = np.array(
        [
            [0.0, 0.2, 0.4, 0.4],
            [0.0, 0.6, 0.2, 0.2],
            [0.0, 0.3, 0.5, 0.2],
            [0.0, 0.8, 0.1, 0.1],
        ]
    )
    maps = normalized_noun_maps(cross, [[1], [2, 3]], grid=(4, 4), upscale=2)
    assert maps.shape == (4, 4, 2)
    # Noun 0 (token 1): low-res [[0.2, 0.6], [0.3, 0.8]] -> (m - 0.2) / 0.8.
    low0 = np.array([[0.0, 0.4], [0.1, 0.6]]) / 0.8
    np.testing.assert_allclose(maps[..., 0], np.kron(low0, np.ones((2, 2))), atol=1e-12)
    # Noun 1 (tokens 2 and 3 averaged): [[0.4, 0.2], [0.35, 0.1]] -> (m - 0.1) / 0.4.
    low1 = np.array([[0.3, 0.1], [0.25, 0.0]]) / 0.4
    np.testing.assert_allclose(maps[..., 1], np.kron(low1, np.ones((2, 2))), atol=1e-12)


def test_normalized_noun_maps_subtracts_the_absolute_minimum():
    # The reference's quirk: (map - |min|) / max, so a negative minimum is added, not subtracted.
    cross = np.array([[-0.5], [1.0]])
    maps = normalized_noun_maps(cross, [[0]], grid=(1, 2), upscale=1)
    np.testing.assert_allclose(maps[..., 0], [[(-0.5 - 0.5) / 1.0, (1.0 - 0.5) / 1.0]])


# ---------------------------------------------------------------------------------------------------------------
# Object clusters
# ---------------------------------------------------------------------------------------------------------------


def _clusters_with_scores(scores, nouns=1):
    """Labels with one row per cluster, and noun maps constant per row (so each cluster's score is exact)."""
    labels = np.repeat(np.arange(NUM_SEGMENTS)[:, None], 4, axis=1)
    maps = np.zeros((NUM_SEGMENTS, 4, nouns))
    for noun in range(nouns):
        for cluster in range(NUM_SEGMENTS):
            maps[cluster, :, noun] = scores[noun][cluster] if nouns > 1 else scores[cluster]
    return labels, maps


def test_threshold_ratio_is_the_reference_value():
    assert OBJECT_SCORE_RATIO == 1.4 and NUM_SEGMENTS == 5


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.9, 0.5, 0.1, 0.1, 0.1], [0, 1]),  # others [.5, .1, .1, .1] -> threshold .28
        ([0.1, 0.1, 0.1, 0.1, 0.1], []),  # nothing stands out
        # 0.3 > 1.4 * 0.2: selected only if the max is removed from the mean (with it: 1.4 * .22 = .308).
        ([0.2, 0.3, 0.2, 0.2, 0.2], [1]),
        # Two equal maxima: only one occurrence is removed, threshold 1.4 * (.3 + .6) / 4 = .315 -> none
        # (removing both would give 1.4 * .2 = .28 and select both).
        ([0.3, 0.2, 0.3, 0.2, 0.2], []),
        ([0.6, 0.2, 0.6, 0.2, 0.2], [0, 2]),
    ],
)
def test_object_clusters_threshold_rule(scores, expected):
    labels, maps = _clusters_with_scores(scores)
    assert object_clusters(labels, maps) == expected


def test_object_clusters_takes_the_best_noun_per_cluster():
    labels, maps = _clusters_with_scores([[0.9, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.8]], nouns=2)
    # Scores are [.9, .1, .1, .1, .8]: others [.1, .1, .1, .8] -> threshold .385.
    assert object_clusters(labels, maps) == [0, 4]


def test_object_clusters_uses_the_mean_inside_each_cluster():
    labels = np.array([[0, 0, 1, 1], [2, 2, 3, 4]])
    maps = np.array([[1.0, 0.0, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])[..., None]
    # Cluster 0 mean 0.5; others 0.1 -> threshold 0.14.
    assert object_clusters(labels, maps) == [0]


# ---------------------------------------------------------------------------------------------------------------
# Whole self-segmentation on synthetic maps
# ---------------------------------------------------------------------------------------------------------------

GRID = 8


def _synthetic_maps(object_rows, object_cols, noun_positions, tokens=8, seed=0):
    """Block-structured self-attention (the object and the 4 background quadrants around it) and noun maps.

    Everything is aligned to 2x2 blocks so that the 4x4 cross-attention grid represents the regions exactly. Each
    background region's noun values are ``linspace(0.1, 0.3)`` over its low-resolution pixels (mean 0.2, so every
    background cluster scores the same), the object's are in [0.8, 0.9].
    """
    generator = np.random.default_rng(seed)
    groups = np.zeros((GRID, GRID), dtype=int)
    groups[: GRID // 2, GRID // 2 :] = 1
    groups[GRID // 2 :, : GRID // 2] = 2
    groups[GRID // 2 :, GRID // 2 :] = 3
    obj = np.zeros((GRID, GRID), dtype=bool)
    obj[object_rows, object_cols] = True
    groups[obj] = 4
    flat = groups.reshape(-1)
    self_attention = np.zeros((GRID * GRID, GRID * GRID))
    for group in range(5):
        members = flat == group
        assert members.any()
        self_attention[np.ix_(members, members)] = 0.9 / members.sum()
        self_attention[np.ix_(members, ~members)] = 0.1 / (~members).sum()
    self_attention += generator.uniform(0, 1e-4, self_attention.shape)
    self_attention /= self_attention.sum(1, keepdims=True)

    low = GRID // 2
    low_groups = groups[::2, ::2]
    cross = generator.uniform(0.0, 1.0, (low, low, tokens))
    for positions in noun_positions:
        for position in positions:
            noun = np.empty((low, low))
            for group in range(4):
                noun[low_groups == group] = np.linspace(0.1, 0.3, int((low_groups == group).sum()))
            noun[low_groups == 4] = generator.uniform(0.8, 0.9, int((low_groups == 4).sum()))
            cross[..., position] = noun
    return self_attention, cross.reshape(low * low, tokens), obj


def test_self_segmentation_masks_find_the_object_of_each_image():
    positions = [[3, 4]]
    app_self, app_cross, app_obj = _synthetic_maps(slice(2, 6), slice(2, 6), positions, seed=1)
    struct_self, struct_cross, struct_obj = _synthetic_maps(slice(2, 6), slice(0, 4), positions, seed=2)
    self_attention = torch.from_numpy(np.stack([app_self, struct_self])).float()
    cross_attention = torch.from_numpy(np.stack([app_cross, struct_cross])).float()
    masks = self_segmentation_masks(self_attention, cross_attention, positions, (GRID, GRID))
    assert masks.shape == (2, GRID, GRID) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks[0], torch.from_numpy(app_obj).float())
    assert torch.equal(masks[1], torch.from_numpy(struct_obj).float())


def test_self_segmentation_masks_ignore_tokens_other_than_the_noun():
    # The noun map (token 5) is flat: nothing stands out, whatever the other tokens show.
    self_attention, cross, _ = _synthetic_maps(slice(2, 6), slice(2, 6), [[3]], seed=3)
    cross = cross.copy()
    cross[:, 5] = 0.1  # a flat map normalises to 0 everywhere
    masks = self_segmentation_masks(
        torch.from_numpy(np.stack([self_attention] * 2)).float(),
        torch.from_numpy(np.stack([cross] * 2)).float(),
        [[5]],
        (GRID, GRID),
    )
    assert masks.sum() == 0


def test_kmeans_stream_matches_the_reference_global_seeding(monkeypatch):
    """The reference seeds numpy's global RNG with 1 once, then clusters the appearance and the structure maps."""
    from sklearn.cluster import KMeans

    from cross_image_attention import segmentation

    generator = np.random.default_rng(5)
    # Unstructured rows, so that k-means' result depends on its random initialisation.
    self_attention = generator.uniform(0, 1, (2, 36, 36))
    cross = generator.uniform(0, 1, (2, 9, 4))

    seen = []
    original = segmentation.cluster_attention_rows

    def recording(rows, random_state):
        labels = original(rows, random_state)
        seen.append(labels)
        return labels

    monkeypatch.setattr(segmentation, "cluster_attention_rows", recording)
    global_state = np.random.get_state()
    np.random.seed(123)  # the module must not depend on (nor touch) the global state
    before = np.random.get_state()[1].copy()
    self_segmentation_masks(torch.from_numpy(self_attention).float(), torch.from_numpy(cross).float(), [[1]], (6, 6))
    assert np.array_equal(np.random.get_state()[1], before)

    try:
        np.random.seed(1)
        expected = [KMeans(n_clusters=5, n_init=10).fit(rows).labels_ for rows in self_attention.astype(np.float32)]
    finally:
        np.random.set_state(global_state)
    assert len(seen) == 2
    for labels, reference in zip(seen, expected):
        assert np.array_equal(labels, reference)
