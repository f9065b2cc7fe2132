"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"): the
distance between two images is, summed over five feature taps of a frozen classification network, the spatial
mean of a learned non-negative channel weighting of the squared difference of the unit-normalized features.

Weights come from one local file in the key layout of the ``lpips`` package's checkpoints (the state dict of
its ``LPIPS`` module): ``net.slice{1..5}.{index}.weight/bias`` for the backbone convolutions, numbered as in
the torchvision ``features`` sequence they were taken from, and ``lin{0..4}.model.1.weight`` for the
calibration (index 0 of that sequence is a weightless dropout).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hidream_ft.model.safetensors_io import read_safetensors
from hidream_ft.perceptual.errors import PerceptualWeightsError
from hidream_ft.perceptual.images import square_resize

# The published input scaling for [-1, 1] images (per-channel shift and scale of the "v0.1" metric).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Added to the feature norm before dividing, as the published metric does, so an all-zero feature stays zero.
NORM_EPS = 1e-10


@dataclass(frozen=True)
class Conv:
    index: int  # position in the torchvision ``features`` sequence: the key's ``{index}``
    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 1


@dataclass(frozen=True)
class Pool:
    index: int
    kernel: int
    stride: int


@dataclass(frozen=True)
class Backbone:
    """A feature network as five slices, each ending at a ReLU whose output is a tap."""

    slices: tuple[tuple[Conv | Pool, ...], ...]

    @property
    def channels(self) -> list[int]:
        return [[layer for layer in part if isinstance(layer, Conv)][-1].out_channels for part in self.slices]


def _vgg_block(first: int, channels: list[int], pool: bool) -> tuple[Conv | Pool, ...]:
    """VGG16 convolutions (3×3, each followed by a ReLU), preceded by a 2×2 max pool unless first."""
    layers: list[Conv | Pool] = [Pool(first, 2, 2)] if pool else []
    index = first + 1 if pool else first
    for c_in, c_out in zip(channels, channels[1:]):
        layers.append(Conv(index, c_in, c_out, 3))
        index += 2
    return tuple(layers)


BACKBONES = {
    # AlexNet taps relu1..relu5; the convolutions sit at features 0, 3, 6, 8, 10, the 3×3/2 max pools at 2, 5.
    "alex": Backbone((
        (Conv(0, 3, 64, 11, stride=4, padding=2),),
        (Pool(2, 3, 2), Conv(3, 64, 192, 5, padding=2)),
        (Pool(5, 3, 2), Conv(6, 192, 384, 3)),
        (Conv(8, 384, 256, 3),),
        (Conv(10, 256, 256, 3),),
    )),
    # VGG16 taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    "vgg": Backbone((
        _vgg_block(0, [3, 64, 64], pool=False),
        _vgg_block(4, [64, 128, 128], pool=True),
        _vgg_block(9, [128, 256, 256, 256], pool=True),
        _vgg_block(16, [256, 512, 512, 512], pool=True),
        _vgg_block(23, [512, 512, 512, 512], pool=True),
    )),
}


def _slice(layers: tuple[Conv | Pool, ...]) -> nn.Sequential:
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for layer in layers:
        if isinstance(layer, Pool):
            modules[str(layer.index)] = nn.MaxPool2d(layer.kernel, layer.stride)
        else:
            modules[str(layer.index)] = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel,
                                                  layer.stride, layer.padding)
            modules[str(layer.index + 1)] = nn.ReLU()
    return nn.Sequential(modules)


class Calibration(nn.Module):
    """One tap's learned channel weights: a bias-free 1×1 convolution to one channel, at ``model.1``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(OrderedDict([("1", nn.Conv2d(channels, 1, 1, bias=False))]))


def unit_normalize(features: torch.Tensor) -> torch.Tensor:
    """Each spatial position's channel vector divided by its length (plus :data:`NORM_EPS`), in fp32."""
    features = features.float()
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


class LPIPS(nn.Module):
    """A frozen LPIPS metric; ``forward(a, b)`` → [B] distances of [-1, 1] images, differentiable in both.

    Images are squashed to ``resolution`` × ``resolution`` first (:func:`square_resize`).
    """

    def __init__(self, net: str = "alex", resolution: int = 224) -> None:
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"unknown LPIPS network {net!r}; expected one of {sorted(BACKBONES)}")
        backbone = BACKBONES[net]
        self.resolution = resolution
        self.net = nn.Module()
        for number, layers in enumerate(backbone.slices, start=1):
            self.net.add_module(f"slice{number}", _slice(layers))
        for number, channels in enumerate(backbone.channels):
            self.add_module(f"lin{number}", Calibration(channels))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def load(cls, path: str | Path, net: str = "alex", resolution: int = 224,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LPIPS:
        """The metric with the weights of ``path`` (.safetensors, or a torch .pth/.pt state dict)."""
        state = read_state_dict(Path(path))
        metric = cls(net, resolution)
        # The lpips package also saves its input scaling; it is fixed here (SHIFT, SCALE).
        state = {key: value for key, value in state.items() if not key.startswith("scaling_layer.")}
        expected = set(metric.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise PerceptualWeightsError(
                f"LPIPS weights {path}: not an lpips '{net}' checkpoint (missing {missing[:4]}, "
                f"unexpected {extra[:4]})")
        negative = [key for key in state if key.startswith("lin") and bool((state[key] < 0).any())]
        if negative:
            raise PerceptualWeightsError(f"LPIPS weights {path}: negative calibration weights in {negative}")
        try:
            metric.load_state_dict(state)
        except RuntimeError as error:
            raise PerceptualWeightsError(f"LPIPS weights {path}: {error}") from error
        return metric.to(device=device, dtype=dtype)

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode: the metric is fixed."""
        return super().train(False)

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] in [-1, 1] → the five unit-normalized fp32 feature maps."""
        x = (square_resize(images.float(), self.resolution) - self.shift) / self.scale
        x = x.to(self.lin0.model[0].weight.dtype)
        features = []
        for part in self.net.children():  # slice1..slice5, in order
            x = part(x)
            features.append(unit_normalize(x))
        return features

    def distance_of_taps(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """[B] distances from two images' :meth:`taps`."""
        total = 0
        for number, (fa, fb) in enumerate(zip(a, b)):
            weight = getattr(self, f"lin{number}").model[0].weight.float()
            total = total + nn.functional.conv2d((fa - fb).pow(2), weight).mean(dim=(1, 2, 3))
        return total

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance_of_taps(self.taps(a), self.taps(b))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file read without running any code it may hold (``weights_only``)."""
    if not path.is_file():
        raise PerceptualWeightsError(f"LPIPS weights {path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise PerceptualWeightsError(f"LPIPS weights {path}: cannot be read as a torch file ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise PerceptualWeightsError(f"LPIPS weights {path}: not a state dict of tensors")
    return state


def lpips_loss(metric: LPIPS, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS distance of the predicted image to the target, [B]; gradients reach ``prediction``
    only (the target's features are computed without a graph)."""
    with torch.no_grad():
        target_taps = metric.taps(target)
    return metric.distance_of_taps(metric.taps(prediction), target_taps)
