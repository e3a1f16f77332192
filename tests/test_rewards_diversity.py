"""``clip_diversity``: mean CLIP image-embedding distance within a group, on the shipped world CLIP."""

from __future__ import annotations

import pytest
import torch

import rewards
from rewards.diversity import mean_pairwise_distance


def test_mean_pairwise_distance_matches_a_loop_over_pairs():
    """Each row's value is the mean over the other rows of its group of 1 - cosine (torch's cosine_similarity)."""
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64)
    groups = [0, 0, 1, 0, 2]
    expected = []
    for i in range(5):
        others = [j for j in range(5) if j != i and groups[j] == groups[i]]
        d = [1 - torch.nn.functional.cosine_similarity(x[i], x[j], dim=0).item() for j in others]
        expected.append(sum(d) / len(d) if d else 0.0)
    assert torch.allclose(mean_pairwise_distance(x, groups), torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_collapse_scores_zero_and_variety_scores_higher():
    """Identical images of a prompt score 0; the same number of different scenes score above 0; ``by: batch``
    compares across prompts; one image a prompt with ``by: prompt`` is refused with the fix."""
    reward = rewards.get_reward("clip_diversity", model="ddpo-world-clip", pretrained="world")
    torch.manual_seed(0)
    same = torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1)
    varied = torch.rand(4, 3, 32, 32)
    prompts = ["a red cube"] * 4
    assert torch.allclose(reward(same, prompts), torch.zeros(4), atol=1e-5)
    assert (reward(varied, prompts) > 1e-3).all()
    batch = rewards.get_reward("clip_diversity", model="ddpo-world-clip", pretrained="world", by="batch")
    distinct = [f"prompt {i}" for i in range(4)]
    assert torch.equal(batch(varied, distinct), reward(varied, prompts))
    with pytest.raises(ValueError, match="use the option by: batch"):
        reward(varied, distinct)
