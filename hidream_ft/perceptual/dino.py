"""DINO image embeddings (DINOv2 or DINOv3 through transformers' own classes) and the loss and similarity
built on them. The network is frozen: gradients reach the images, never its weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from hidream_ft.perceptual.errors import PerceptualWeightsError
from hidream_ft.perceptual.images import normalize_channels, square_resize

# The statistics both DINO generations were trained with (their image processors' image_mean / image_std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoFeatures(nn.Module):
    """A frozen DINO backbone that maps [-1, 1] images of any size to unit-length embeddings [B, D].

    The embedding is the final-norm CLS token; with ``with_patch_mean`` the mean of the patch tokens (register
    tokens excluded) is concatenated to it, which adds spatial layout to the global summary (D doubles).
    """

    def __init__(self, backbone: nn.Module, resolution: int = 224, with_patch_mean: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.resolution = resolution
        self.with_patch_mean = with_patch_mean
        self.prefix_tokens = 1 + getattr(backbone.config, "num_register_tokens", 0)

    @classmethod
    def load(cls, path: str | Path, resolution: int = 224, with_patch_mean: bool = False,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DinoFeatures:
        """The model saved at ``path`` (a transformers folder: config.json + weights), frozen, in eval mode."""
        try:
            backbone = AutoModel.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError) as error:
            raise PerceptualWeightsError(f"DINO model {path}: cannot be loaded ({error})") from error
        if not hasattr(backbone, "embeddings") or not hasattr(backbone.config, "patch_size"):
            raise PerceptualWeightsError(
                f"DINO model {path}: {type(backbone).__name__} is not a DINO vision transformer")
        return cls(backbone.to(device), resolution, with_patch_mean)

    def train(self, mode: bool = True) -> DinoFeatures:
        """Stays in eval mode: the backbone is a fixed feature extractor."""
        return super().train(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, D] float32 unit vectors; differentiable with respect to ``images``."""
        dtype = next(self.backbone.parameters()).dtype
        pixels = normalize_channels(square_resize(images.float(), self.resolution), IMAGENET_MEAN, IMAGENET_STD)
        tokens = self.backbone(pixel_values=pixels.to(dtype)).last_hidden_state.float()
        features = tokens[:, 0]
        if self.with_patch_mean:
            features = torch.cat([features, tokens[:, self.prefix_tokens:].mean(dim=1)], dim=-1)
        return F.normalize(features, dim=-1)


def dino_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two batches of :meth:`DinoFeatures.embed` embeddings, [B, D] × [B, D] → [B]."""
    return (a * b).sum(dim=-1)


def dino_loss(features: DinoFeatures, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cosine similarity between the DINO embeddings of the predicted and target images, [B].

    Gradients flow into ``prediction`` only; the target's embedding is computed without a graph.
    """
    with torch.no_grad():
        target_embedding = features.embed(target)
    return 1 - dino_similarity(features.embed(prediction), target_embedding)
