"""A two-row test zoo (``tiny_a``, ``tiny_b``) of tiny CNNs, added through the zoo's registration API.

Other ids keep resolving through the real registry. Rows are registered, never patched in, so
subprocess launchers (torchrun, a killed evaluator) get the same zoo with one call.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from eval import zoo


class TinyNet(torch.nn.Module):
    """A few thousand parameters, initialised from the model id so every process builds the same net."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.head = torch.nn.Linear(8 * 16, 1000)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


def tiny_specs() -> dict[str, zoo.ModelSpec]:
    # Borrow a real row for the fields the tiny nets do not care about; outside our 32-model set.
    base = zoo.load_registry(zoo.REGISTRY_FILE)["mobilenet_v3_small"]
    tiny = dataclasses.replace(base, arch="tiny", paper32=False)
    return {
        "tiny_a": dataclasses.replace(tiny, id="tiny_a", input_size=48, interpolation="bicubic"),
        "tiny_b": dataclasses.replace(tiny, id="tiny_b", input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    }


def build_tiny(spec: zoo.ModelSpec, *, pretrained: bool, weights_dir: Path | None) -> TinyNet:
    """The same net with or without ``pretrained``: the weights are the seed."""
    return TinyNet(zlib.crc32(spec.id.encode()))


@contextmanager
def tiny_zoo_registered() -> Iterator[dict[str, zoo.ModelSpec]]:
    """The tiny rows for the ``with`` block (``replace``: a fixture inside another's block is fine)."""
    specs = tiny_specs()
    with zoo.registered(*specs.values(), factory=build_tiny, replace=True):
        yield specs


def install_tiny_zoo() -> None:
    """Register the tiny rows for the rest of this process (subprocess launchers)."""
    for spec in tiny_specs().values():
        zoo.register_model(spec, build_tiny, replace=True)
