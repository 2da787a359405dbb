"""Model zoo: architectures in plain torch, created by name with ``create_model``.

Every model maps inputs of shape ``(N, C, H, W)``, pixels in ``[0, 1]``, to ``(N, K)`` logits.
Input shape and class count come from the dataset. Every zoo model is an ``nn.Sequential``
whose first parameterised layer is a ``Conv2d`` or ``Linear`` (possibly after a parameter-free
``Flatten``): PixelDP places its noise layer right after that layer and bounds its operator
norm, so the model must not normalise its input with data-dependent statistics before it.

Registering a model is one decorated factory function in a module listed under the
``certbench.models`` entry-point group (:mod:`bench.registry`)::

    @register_model                    # or @register_model("my-net")
    def my_net(input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from bench.errors import ConfigError
from bench.registry import MODELS, register_model

__all__ = ["create_model", "first_layer_index", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted model names, optionally filtered by a glob ``pattern``."""
    return MODELS.names(pattern)


def create_model(
    name: str, /, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for inputs ``input_shape`` = (C, H, W) and ``num_classes`` outputs."""
    factory: ModelFactory = MODELS.get(name)
    if len(input_shape) != 3:
        raise ConfigError(f"model {name!r}: input_shape must be (C, H, W), got {input_shape}")
    try:
        return factory(tuple(int(s) for s in input_shape), int(num_classes), **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model {name!r} for input {tuple(input_shape)}: {exc}") from exc


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"input side {size} is too small for this architecture")
    return out


# --------------------------------------------------------------------------- small models
@register_model("mlp")
def mlp(input_shape: tuple[int, int, int], num_classes: int, *, hidden: int = 128) -> nn.Module:
    """Two hidden ReLU layers of width ``hidden`` (Flatten, then Linear+ReLU twice, then Linear)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_model("cnn")
def small_cnn(input_shape: tuple[int, int, int], num_classes: int, *, width: int = 16) -> nn.Module:
    """Small CNN for digits-sized inputs: conv3x3(w) → conv3x3(2w, stride 2) → FC 128 → FC K."""
    c, h, w = input_shape
    h2, w2 = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    return nn.Sequential(
        nn.Conv2d(c, width, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * h2 * w2, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@register_model("pixeldp-mnist")
def pixeldp_mnist(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The PixelDP paper's MNIST CNN: conv5x5(32) → pool → conv5x5(64) → pool → FC 1024 → FC K."""
    c, h, w = input_shape
    h2, w2 = h // 4, w // 4
    if h2 < 1 or w2 < 1:
        raise ValueError("input side must be at least 4")
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * h2 * w2, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


@register_model("wk-small")
def wk_small(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Wong & Kolter's small conv net (the released MNIST/Fashion-MNIST models).

    Conv2d(C,16,4,s2,p1) → ReLU → Conv2d(16,32,4,s2,p1) → ReLU → Flatten → Linear(·,100) → ReLU
    → Linear(100,K). State-dict keys match the authors' released ``fashion_mnist.pth``.
    """
    c, h, w = input_shape
    h2 = _conv_out(_conv_out(h, 4, 2, 1), 4, 2, 1)
    w2 = _conv_out(_conv_out(w, 4, 2, 1), 4, 2, 1)
    return nn.Sequential(
        nn.Conv2d(c, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * h2 * w2, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model("wk-large")
def wk_large(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Wong et al. (2018, scaled) large conv net: 4 convs (32,32,64,64) → FC 512 → FC 512 → FC K."""
    c, h, w = input_shape
    h2 = _conv_out(_conv_out(h, 4, 2, 1), 4, 2, 1)
    w2 = _conv_out(_conv_out(w, 4, 2, 1), 4, 2, 1)
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * h2 * w2, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


# --------------------------------------------------------------------------- residual nets
class _PreActBlock(nn.Module):
    """Pre-activation residual block (BN → ReLU → conv3x3 → BN → ReLU → conv3x3) + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        out = self.conv1(nn.functional.relu(self.bn1(x)))
        out = self.conv2(self.dropout(nn.functional.relu(self.bn2(out))))
        return out + self.shortcut(x)


def _resnet(
    input_shape: tuple[int, int, int],
    num_classes: int,
    widths: tuple[int, int, int],
    blocks_per_stage: int,
    dropout: float = 0.0,
) -> nn.Module:
    c = input_shape[0]
    layers: list[nn.Module] = [nn.Conv2d(c, 16, 3, stride=1, padding=1, bias=False)]
    c_in = 16
    for stage, width in enumerate(widths):
        for b in range(blocks_per_stage):
            stride = 2 if (stage > 0 and b == 0) else 1
            layers.append(_PreActBlock(c_in, width, stride, dropout))
            c_in = width
    layers += [
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c_in, num_classes),
    ]
    return nn.Sequential(*layers)


@register_model("resnet")
def cifar_resnet(
    input_shape: tuple[int, int, int], num_classes: int, *, depth: int = 110
) -> nn.Module:
    """CIFAR ResNet of He et al. (pre-activation), depth 6n+2; Cohen et al. used depth 110."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"ResNet depth must be 6n+2 (e.g. 20, 56, 110), got {depth}")
    return _resnet(input_shape, num_classes, (16, 32, 64), (depth - 2) // 6)


@register_model("resnet110")
def resnet110(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """ResNet-110 for CIFAR (Cohen et al.'s randomized-smoothing base classifier)."""
    return cifar_resnet(input_shape, num_classes, depth=110)


@register_model("wrn-28-10")
def wide_resnet(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    depth: int = 28,
    widen: int = 10,
    dropout: float = 0.3,
) -> nn.Module:
    """Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis); PixelDP's CIFAR model is WRN-28-10."""
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4 (e.g. 16, 28), got {depth}")
    return _resnet(
        input_shape, num_classes, (16 * widen, 32 * widen, 64 * widen), (depth - 4) // 6, dropout
    )


def first_layer_index(model: nn.Module) -> int:
    """Index (in an ``nn.Sequential``) of the first parameterised layer; modules before it
    must be parameter-free (e.g. ``Flatten``). Raises ConfigError otherwise."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"{type(model).__name__} is not an nn.Sequential; cannot find its first layer"
        )
    for i, m in enumerate(model):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return i
        if any(True for _ in m.parameters()):
            raise ConfigError(
                f"layer {i} ({type(m).__name__}) has parameters before the first Conv2d/Linear"
            )
    raise ConfigError("model has no Conv2d or Linear layer")
