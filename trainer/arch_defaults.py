"""Which architecture and weights a first model gets when nobody says.

Torch-free, so that the settings and the CLI can read it without loading the
training stack.

Small images (8x8 digits, 28x28 X-ray thumbnails) get the small CNN: on our
tiny offline sets ImageNet features did not help there. Camera-sized frames
(natural or endoscopic, ``PRETRAINED_MIN_INPUT`` pixels and up) start from an
ImageNet-pretrained EfficientNet-Lite0, as AIFT (Zhou et al., CVPR 2017)
starts from a pretrained CNN.
"""

ARCHITECTURES = (
    "small-cnn",
    "resnet18",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_lite0",
)
"""Every architecture ``trainer.architectures.build_model`` builds."""

PRETRAINED_ARCHITECTURES = ("efficientnet_lite0",)
"""Architectures whose ImageNet weights ship as a Python package (no download at run time)."""

PRETRAINED_MIN_INPUT = 64
"""The smallest input side (pixels) that gets the pretrained backbone by default."""


def default_arch(input_size: int | tuple[int, int]) -> str:
    """``efficientnet_lite0`` from ``PRETRAINED_MIN_INPUT`` pixels up, else ``small-cnn``.

    Args:
        input_size: side length, or ``(height, width)``; the smaller side decides.
    """
    side = input_size if isinstance(input_size, int) else min(input_size)
    return "efficientnet_lite0" if side >= PRETRAINED_MIN_INPUT else "small-cnn"


def default_pretrained(arch: str, has_weights: bool) -> bool:
    """Whether to load an architecture's packaged ImageNet weights when nobody says.

    Args:
        arch: the architecture name.
        has_weights: a local checkpoint was given; it takes the place of the
            packaged weights.
    """
    return arch in PRETRAINED_ARCHITECTURES and not has_weights
