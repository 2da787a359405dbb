"""Model zoo: architectures in plain torch, created by name with ``create_model``.

Every model maps inputs of shape ``(N, C, H, W)``, pixels in ``[0, 1]``, to ``(N, K)`` logits.
Input shape and class count come from the dataset. Every zoo model is an ``nn.Sequential``
whose first parameterised layer is a ``Conv2d`` or ``Linear`` (possibly after a parameter-free
``Flatten``): PixelDP places its noise layer right after that layer and bounds its operator
norm, so the model must not normalise its input with data-dependent statistics before it.

A model is named in one of two ways, in specs (``model = ...``), on the command line
(``--model ...``) and in :func:`create_model`:

* **a registered name** (``"cnn"``): a factory ``f(input_shape, num_classes, **kwargs)``
  decorated in a module listed under the ``certbench.models`` entry-point group
  (:mod:`bench.registry`)::

      @register_model                    # or @register_model("my-net")
      def my_net(input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module: ...

* **an import path** ``"package.module:Attribute"`` (``"mypkg.nets:SmallCNN"``): an
  ``nn.Module`` class or a factory function, found with :mod:`importlib` (the current
  directory is searched too, as ``python -m`` would). It is called with ``input_shape=`` and
  ``num_classes=`` for each of the two its signature names, and with nothing else; so
  ``class SmallCNN(nn.Module): def __init__(self): ...`` works as it is.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from bench.errors import ConfigError, RegistryError
from bench.registry import MODELS, register_model

__all__ = [
    "create_model",
    "first_layer_index",
    "is_import_path",
    "list_models",
    "register_model",
    "resolve_model",
]

ModelFactory = Callable[..., nn.Module]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
IMPORT_PATH_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
"""``package.module:Attribute`` (the attribute may be dotted, ``module:Outer.Inner``)."""


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a glob ``pattern`` (models named
    by import path are not listed: any importable class or factory is one)."""
    return MODELS.names(pattern)


def is_import_path(name: object) -> bool:
    """Whether ``name`` names a model by import path (it contains ``':'``; registered names
    never do)."""
    return isinstance(name, str) and ":" in name


def _import_module(module_name: str, name: str):
    """Import ``module_name`` for model ``name``, retrying with the current directory on the
    path (the console script does not put it there, ``python -m`` does)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
        missing = exc.name or ""
        if cwd in on_path or not module_name.startswith(missing.split(".")[0]):
            raise _import_error(name, module_name, exc) from None
        sys.path.append(cwd)
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module_name)
        except Exception as retry:
            raise _import_error(name, module_name, retry) from None
    except Exception as exc:  # a user module that fails while importing: one line, its error
        raise _import_error(name, module_name, exc) from None


def _import_error(name: str, module_name: str, exc: BaseException) -> ConfigError:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    hint = ""
    if isinstance(exc, ModuleNotFoundError):
        hint = " (install its package, or run from the directory that holds it)"
    return ConfigError(
        f"model {name!r}: cannot import module {module_name!r}: {type(exc).__name__}: {msg}{hint}"
    )


def resolve_model(name: str) -> ModelFactory:
    """The ``nn.Module`` class or factory named by the import path ``name``
    (``"package.module:Attribute"``); a :class:`ConfigError` naming the path and what is wrong
    otherwise (bad syntax, module not importable, no such attribute, not callable)."""
    if not isinstance(name, str) or not IMPORT_PATH_RE.match(name):
        raise ConfigError(
            f"model {name!r} is not an import path 'package.module:Attribute' "
            "(e.g. 'mypkg.nets:SmallCNN')"
        )
    module_name, _, attr = name.partition(":")
    obj: Any = _import_module(module_name, name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"model {name!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ConfigError(f"model {name!r}: class {attr} is not an nn.Module subclass")
    if not callable(obj):
        raise ConfigError(
            f"model {name!r}: {attr} is a {type(obj).__name__}, not an nn.Module class or a "
            "factory function"
        )
    return obj


def _build_from_path(
    name: str, input_shape: tuple[int, int, int], num_classes: int, kwargs: dict[str, Any]
) -> nn.Module:
    """Call the class or factory at import path ``name`` (module docstring)."""
    factory = resolve_model(name)
    call = dict(kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: call it as it is
        params = {}
    for key, value in (("input_shape", input_shape), ("num_classes", num_classes)):
        p = params.get(key)
        if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            call.setdefault(key, value)
    try:
        model = factory(**call)
    except (TypeError, ValueError) as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in call.items())
        raise ConfigError(f"model {name!r}: calling it with ({shown}) failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def create_model(
    name: str, /, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` (a registered name or an import path, module docstring) for
    inputs ``input_shape`` = (C, H, W) and ``num_classes`` outputs."""
    if is_import_path(name):
        if len(input_shape) != 3:
            raise ConfigError(f"model {name!r}: input_shape must be (C, H, W), got {input_shape}")
        shape = tuple(int(s) for s in input_shape)
        return _build_from_path(name, shape, int(num_classes), kwargs)  # type: ignore[arg-type]
    try:
        factory: ModelFactory = MODELS.get(name)
    except RegistryError as exc:
        raise RegistryError(
            f"{exc}; a model of your own is named by import path, e.g. 'mypkg.nets:SmallCNN'"
        ) from None
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
