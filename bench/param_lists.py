"""The parameter lists the benchmark steps over: the shapes of real models, not one big tensor.

What an optimizer step costs depends on the list as much as on its element count: per-tensor
overheads (a Python loop, a kernel launch, a vector loop's scalar tail) dominate a list of many
small tensors, memory bandwidth dominates one huge tensor, and real models sit in between. A list
here is only shapes; tensors are allocated for the case being timed and freed after it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ParamList:
    name: str
    description: str
    shapes: Tuple[Shape, ...]

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def gpt2_small() -> ParamList:
    """GPT-2 small in the order of Hugging Face's `GPT2LMHeadModel.named_parameters()` (the LM
    head is tied to wte and adds no tensor): 148 tensors, 124,439,808 elements. Its attention and
    MLP weights are HF `Conv1D`s, stored (in_features, out_features)."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (context, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),            # ln_1 weight, bias
            (d, 3 * d), (3 * d,),  # attn.c_attn weight, bias
            (d, d), (d,),          # attn.c_proj
            (d,), (d,),            # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),      # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return ParamList("gpt2", "GPT-2 small (148 tensors, 124M elements)", tuple(shapes))


def resnet50() -> ParamList:
    """torchvision's ResNet-50 in `named_parameters()` order: the stem, 16 bottlenecks
    (1x1, 3x3, 1x1 convs, each followed by BatchNorm's weight and bias; the first block of each
    stage adds a 1x1 projection shortcut with its BatchNorm) and the classifier: 161 tensors,
    25,557,032 elements."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    in_channels = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        out_channels = 4 * width  # bottleneck expansion
        for block in range(blocks):
            shapes += [
                (width, in_channels, 1, 1), (width,), (width,),
                (width, width, 3, 3), (width,), (width,),
                (out_channels, width, 1, 1), (out_channels,), (out_channels,),
            ]
            if block == 0:  # downsample: 1x1 conv + BatchNorm on the shortcut
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(1000, 2048), (1000,)]  # fc
    return ParamList("resnet50", "ResNet-50 (161 tensors, 25.6M elements)", tuple(shapes))


def many_small(count: int = 2000, smallest: int = 1024, largest: int = 16384, seed: int = 0) -> ParamList:
    """`count` 1-D tensors of uniformly drawn sizes in [smallest, largest], the same every run
    (seeded): the regime where per-tensor overhead, not bandwidth, decides."""
    rng = random.Random(seed)
    shapes = tuple((rng.randint(smallest, largest),) for _ in range(count))
    return ParamList("many-small", f"{count} tensors of {smallest // 1024}K-{largest // 1024}K elements", shapes)


def huge(log2_numel: int = 28) -> ParamList:
    """One tensor of 2**log2_numel elements: the pure-bandwidth regime."""
    return ParamList("huge", f"one tensor of 2^{log2_numel} elements", ((2**log2_numel,),))


LISTS: Dict[str, Callable[[], ParamList]] = {
    "gpt2": gpt2_small,
    "resnet50": resnet50,
    "many-small": many_small,
    "huge": huge,
}
