"""A small CNN for 1x8x8 digits that certbench does not ship.

certbench can use it in three ways, none of which needs an edit to certbench:

* as an object: ``bench.evaluate(SmallCNN(), dataset="digits", ...)``;
* by import path, in a spec (``model = "byo_model_example.nets:SmallCNN"``) or on the command
  line (``--model byo_model_example.nets:SmallCNN``): certbench imports the module and calls
  the class with no arguments (its ``__init__`` names neither ``input_shape`` nor
  ``num_classes``);
* by name (``model = "byo-small-cnn"``) once the package is installed: its ``pyproject.toml``
  lists this module under the ``certbench.models`` entry-point group.

Inputs ``(N, 1, 8, 8)`` with pixels in [0, 1]; outputs ``(N, 10)`` logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from bench.models import register_model


class SmallCNN(nn.Module):
    """conv3x3(8) -> ReLU -> max-pool 2 -> conv3x3(16) -> ReLU -> linear(10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


@register_model("byo-small-cnn")
def byo_small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """:class:`SmallCNN` as a registered model (digits-sized inputs only)."""
    if tuple(input_shape) != (1, 8, 8):
        raise ValueError(f"SmallCNN is built for 1x8x8 inputs, got {tuple(input_shape)}")
    return SmallCNN(num_classes)
