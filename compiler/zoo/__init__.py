"""The model zoo: inference ONNX models built from a seed, the inputs the compiler is tested on.

Every model: opset 17, IR version 8, one float32 input ``input`` of shape (batch, *input_shape) with a
dynamic ``batch`` dim_param, one output ``output``; initializers hold parameters only.

    >>> from compiler import zoo
    >>> model = zoo.build("cct-digits", seed=1)
    >>> zoo.ZOO["cct-digits"].input_shape
    (1, 8, 8)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

from compiler.zoo._graph import count_parameters
from compiler.zoo.cct import CCT_2_3X2, CCT_DIGITS, cct_2_3x2, cct_digits
from compiler.zoo.deep_ae import INPUT_DIM, deep_ae
from compiler.zoo.ds_cnn import INPUT_SHAPE as DS_CNN_INPUT_SHAPE
from compiler.zoo.ds_cnn import NUM_CLASSES as DS_CNN_CLASSES
from compiler.zoo.ds_cnn import ds_cnn

TASKS = ("classification", "reconstruction")


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[int], onnx.ModelProto]
    input_shape: tuple[int, ...]        # without the batch axis
    task: str                           # one of TASKS
    num_classes: int | None = None      # classification only

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if (self.task == "classification") != (self.num_classes is not None):
            raise ValueError("num_classes is given exactly for classification models")

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The output shape without the batch axis: logits or the reconstructed input."""
        return (self.num_classes,) if self.task == "classification" else self.input_shape

    def __call__(self, seed: int = 0) -> onnx.ModelProto:
        return self.build(seed)


ZOO: dict[str, ZooModel] = {
    "cct-2-3x2": ZooModel(cct_2_3x2, CCT_2_3X2.input_shape, "classification", CCT_2_3X2.num_classes),
    "cct-digits": ZooModel(cct_digits, CCT_DIGITS.input_shape, "classification", CCT_DIGITS.num_classes),
    "deep-ae": ZooModel(deep_ae, (INPUT_DIM,), "reconstruction"),
    "ds-cnn": ZooModel(ds_cnn, DS_CNN_INPUT_SHAPE, "classification", DS_CNN_CLASSES),
}


def names() -> list[str]:
    return list(ZOO)


def get(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    return get(name).build(seed)


def input_shape(name: str) -> tuple[int, ...]:
    return get(name).input_shape


__all__ = ["ZOO", "ZooModel", "build", "count_parameters", "get", "input_shape", "names"]
