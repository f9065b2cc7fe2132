"""Perceptual losses on the predicted image: frozen DINO embeddings and LPIPS."""

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from hidream_ft.perceptual.dino import DinoFeatures, dino_loss, dino_similarity
from hidream_ft.perceptual.errors import PerceptualWeightsError


@pytest.fixture(scope="module")
def dino_path(tmp_path_factory):
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=32)
    path = tmp_path_factory.mktemp("dino")
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dino(dino_path):
    return DinoFeatures.load(dino_path, resolution=32)


def images(seed: int, n: int = 2, height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_dino_embeddings_are_unit_vectors_of_any_image_size(dino):
    for height, width in [(64, 64), (32, 96), (17, 40)]:
        embedding = dino.embed(images(0, height=height, width=width))
        assert embedding.shape == (2, 32)
        torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))


def test_dino_patch_mean_is_appended_after_the_cls_token(dino_path, dino):
    both = DinoFeatures.load(dino_path, resolution=32, with_patch_mean=True)
    x = images(1)
    embedding = both.embed(x)
    assert embedding.shape == (2, 64)
    cls_part = torch.nn.functional.normalize(embedding[:, :32], dim=-1)
    torch.testing.assert_close(cls_part, dino.embed(x))


def test_dino_loss_is_zero_for_identical_images_and_positive_otherwise(dino):
    a, b = images(2), images(3)
    torch.testing.assert_close(dino_loss(dino, a, a), torch.zeros(2), rtol=0, atol=1e-6)
    assert (dino_loss(dino, a, b) > 1e-4).all()
    torch.testing.assert_close(dino_similarity(dino.embed(a), dino.embed(b)), 1 - dino_loss(dino, a, b))


def test_dino_gradients_reach_the_image_and_never_the_weights(dino):
    prediction = images(4).requires_grad_(True)
    dino_loss(dino, prediction, images(5)).sum().backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in dino.parameters())
    dino.train()
    assert not dino.backbone.training


def test_dino_load_names_a_bad_path(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="cannot be loaded"):
        DinoFeatures.load(tmp_path)
