"""The CNNs Winnow trains: each returns ``(probabilities, embedding)``.

Softmax is inside ``forward`` so that the exported ONNX graph already outputs
probabilities, as the model contract (``schemas.model_spec``) says. The
embedding is the pooled feature vector just before the classifier.

Every model is built offline with random weights; a local checkpoint file can
be loaded on top (for example a torchvision ImageNet state dict copied onto the
machine). Nothing is ever downloaded.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tv

from trainer.errors import ModelBuildError

log = logging.getLogger(__name__)

ARCHITECTURES = ("small-cnn", "resnet18", "mobilenet_v3_small", "mobilenet_v3_large")


class WinnowNet(nn.Module):
    """A backbone that pools to a vector, a dropout and a linear head.

    Attributes:
        embedding_dim: size of the embedding output.
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(logits, embedding)``; training uses the logits."""
        embedding = self.backbone(x)
        return self.head(self.dropout(embedding)), embedding

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, embedding = self.logits(x)
        return torch.softmax(logits, dim=1), embedding


def _small_cnn(channels: int) -> tuple[nn.Module, int]:
    """Three conv blocks for small images (8x8 digits, 28x28 X-rays, and up).

    Only the first two blocks downsample, and the last pools adaptively, so any
    input of 8 pixels or more works.
    """

    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        return layers

    dim = 128
    backbone = nn.Sequential(
        *block(channels, 32, pool=True),
        *block(32, 64, pool=True),
        *block(64, dim, pool=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return backbone, dim


def _first_conv_to_gray(conv: nn.Conv2d) -> nn.Conv2d:
    gray = nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    return gray


def _resnet18(channels: int) -> tuple[nn.Module, int]:
    net = tv.resnet18(weights=None)
    if channels == 1:
        net.conv1 = _first_conv_to_gray(net.conv1)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _mobilenet(factory: Callable[..., tv.MobileNetV3]) -> Callable[[int], tuple[nn.Module, int]]:
    def build(channels: int) -> tuple[nn.Module, int]:
        net = factory(weights=None)
        if channels == 1:
            first = net.features[0][0]
            assert isinstance(first, nn.Conv2d)
            net.features[0][0] = _first_conv_to_gray(first)
        # The embedding is the pooled features before the classifier: keep the
        # first Linear + Hardswish of torchvision's classifier head (its own
        # dropout and last Linear are replaced by ours).
        first_linear = net.classifier[0]
        assert isinstance(first_linear, nn.Linear)
        backbone = nn.Sequential(
            net.features,
            net.avgpool,
            nn.Flatten(),
            first_linear,
            net.classifier[1],
        )
        return backbone, first_linear.out_features

    return build


_BUILDERS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "small-cnn": _small_cnn,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet(tv.mobilenet_v3_small),
    "mobilenet_v3_large": _mobilenet(tv.mobilenet_v3_large),
}
_DROPOUT = {"small-cnn": 0.3, "resnet18": 0.2, "mobilenet_v3_small": 0.2, "mobilenet_v3_large": 0.2}


def build_model(
    arch: str, num_classes: int, channels: int, weights: Path | None = None
) -> WinnowNet:
    """Builds a model that returns ``(probabilities, embedding)``.

    Args:
        arch: one of ``ARCHITECTURES``.
        num_classes: size of the probabilities output (at least 2).
        channels: 1 (grayscale) or 3 (RGB).
        weights: a local checkpoint: either a state dict of this very model
            (as the trainer saves it) or a torchvision state dict of the
            backbone (e.g. ImageNet weights). A classifier whose shape does
            not fit is skipped; for 1 channel, a 3-channel first conv is
            summed over its input channels.

    Raises:
        ModelBuildError: an unknown architecture, bad sizes or an unusable
            checkpoint.
    """
    if arch not in _BUILDERS:
        raise ModelBuildError(f"unknown architecture '{arch}'; choose one of {list(_BUILDERS)}")
    if num_classes < 2:
        raise ModelBuildError(f"a classifier needs at least 2 classes, got {num_classes}")
    if channels not in (1, 3):
        raise ModelBuildError(f"channels must be 1 or 3, got {channels}")
    backbone, dim = _BUILDERS[arch](channels)
    model = WinnowNet(backbone, dim, num_classes, _DROPOUT[arch])
    if weights is not None:
        load_weights(model, arch, weights)
    return model


def load_weights(model: WinnowNet, arch: str, path: Path) -> None:
    """Loads a local checkpoint into ``model``, mapping torchvision key names."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelBuildError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelBuildError(f"{path} does not hold a state dict")
    own = model.state_dict()
    if not any(key in own for key in state):
        state = _map_torchvision_keys(arch, state)
    usable: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        target = own.get(key)
        if target is None:
            skipped.append(key)
            continue
        if target.shape != value.shape and value.ndim == 4 and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # RGB first conv onto a gray input
        if target.shape != value.shape:
            skipped.append(key)
            continue
        usable[key] = value
    if not usable:
        raise ModelBuildError(f"no tensor in {path} fits a {arch} model")
    model.load_state_dict(usable, strict=False)
    log.info("loaded weights path=%s tensors=%d skipped=%s", path, len(usable), skipped)


def _map_torchvision_keys(arch: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Renames a torchvision state dict's keys to this module's keys."""
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if arch == "resnet18":
            new = "head." + key[3:] if key.startswith("fc.") else "backbone." + key
        elif arch.startswith("mobilenet"):
            if key.startswith("features."):
                new = "backbone.0." + key[len("features.") :]
            elif key.startswith("classifier.0."):
                new = "backbone.3." + key[len("classifier.0.") :]
            elif key.startswith("classifier.3."):
                new = "head." + key[len("classifier.3.") :]
            else:
                new = key
        else:
            new = key
        mapped[new] = value
    return mapped
