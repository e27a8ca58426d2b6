"""The one IR every pass reads and writes: tensors, nodes and a graph.

Passes never mutate a Graph they are given; they build a new one (``Graph.replace``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Collection, Iterable, Mapping

import numpy as np


class CompileError(ValueError):
    """A problem with the user's model or options; the message is one line naming the cause."""


class Role(str, Enum):
    INPUT = "input"              # a data batch, written before every step
    LABEL = "label"              # labels / targets for the loss
    FROZEN = "frozen"            # weights that never change on the device
    TRAINABLE = "trainable"      # parameters updated by the optimizer
    CONSTANT = "constant"        # small constants (shapes, scalars) from the model or the compiler
    OPT_STATE = "optimizer_state"  # momentum buffers
    HYPER = "hyperparameter"     # runtime scalars such as the learning rate
    ACTIVATION = "activation"    # forward intermediates and outputs
    GRADIENT = "gradient"        # backward intermediates and parameter gradients
    LOSS = "loss"                # the scalar loss

    @property
    def persistent(self) -> bool:
        """Lives for the whole program, outside the per-step arena."""
        return self in PERSISTENT_ROLES


PERSISTENT_ROLES = frozenset({Role.FROZEN, Role.TRAINABLE, Role.CONSTANT, Role.OPT_STATE, Role.HYPER})

DTYPE_BYTES = {"float32": 4, "float64": 8, "int64": 8, "int32": 4, "bool": 1, "int8": 1}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    role: Role = Role.ACTIVATION
    # sparse update: (axis, k) when only the first k entries along ``axis`` (a weight's output channels) train;
    # the rest of the tensor stays frozen, its gradient has k there (compiler/tuning.py, autodiff.py)
    train_channels: tuple[int, int] | None = None
    per_device: bool = False     # part of each device's own state (adapters), not only trainables: LoRA's
                                 # frozen-but-replaceable A (FFA-LoRA); see ``is_per_device``

    @property
    def grad_shape(self) -> tuple[int, ...]:
        """The shape of this tensor's gradient: the trainable sub-tensor's."""
        if self.train_channels is None:
            return self.shape
        axis, k = self.train_channels
        return self.shape[:axis] + (k,) + self.shape[axis + 1:]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE_BYTES[self.dtype]

    def with_role(self, role: Role) -> "TensorSpec":
        return dataclasses.replace(self, role=role)

    @property
    def is_per_device(self) -> bool:
        """Each device holds its own value: every trainable, and tensors the tuning marks per device."""
        return self.role == Role.TRAINABLE or self.per_device


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    phase: str = "forward"  # forward | backward | update
    layer: str = ""         # the model layer this node belongs to (for patterns and reports)


@dataclass(frozen=True)
class Graph:
    """A computation: named tensors, nodes in a valid execution order, and initial values."""

    tensors: Mapping[str, TensorSpec]
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]           # data inputs (Role.INPUT / Role.LABEL)
    outputs: tuple[str, ...]          # what the graph produces (logits, loss)
    values: Mapping[str, np.ndarray]  # initial values of persistent tensors
    name: str = "model"
    notes: Mapping[str, Any] = field(default_factory=dict)  # what passes report: names recovered at import,
                                                            # LoRA targets chosen, warnings

    def replace(self, **changes: Any) -> "Graph":
        return dataclasses.replace(self, **changes)

    def spec(self, name: str) -> TensorSpec:
        return self.tensors[name]

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {name: [] for name in self.tensors}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users[name].append(node)
        return users

    def by_role(self, *roles: Role) -> list[str]:
        return [name for name, spec in self.tensors.items() if spec.role in roles]

    def parameter_count(self, *roles: Role) -> int:
        return sum(self.tensors[n].size for n in self.by_role(*roles))

    def pruned(self, keep: Iterable[str], always: Collection[str] = ()) -> "Graph":
        """Drop nodes whose results nobody needs; nodes of the ops in ``always`` stay (the in-place parameter
        updates, ``compiler.ops.UPDATE_OPS``)."""
        needed = set(keep)
        nodes: list[Node] = []
        for node in reversed(self.nodes):
            if node.op in always or any(o in needed for o in node.outputs):
                nodes.append(node)
                needed.update(i for i in node.inputs if i)
        nodes.reverse()
        live = needed | {o for n in nodes for o in n.outputs} | set(self.inputs)
        tensors = {k: v for k, v in self.tensors.items() if k in live}
        return self.replace(nodes=tuple(nodes), tensors=tensors,
                            values={k: v for k, v in self.values.items() if k in tensors},
                            outputs=tuple(o for o in self.outputs if o in tensors))

    def check(self) -> None:
        """Every input is defined before it is used; every tensor has a spec."""
        defined = set(self.inputs) | {n for n, s in self.tensors.items() if s.role.persistent}
        for node in self.nodes:
            for name in node.inputs:
                if name and name not in defined:
                    raise CompileError(f"node {node.name!r} ({node.op}) reads {name!r} before it is defined")
            for name in node.outputs:
                if name not in self.tensors:
                    raise CompileError(f"node {node.name!r} ({node.op}) writes {name!r}, which has no spec")
                defined.add(name)
        for name in self.by_role(Role.FROZEN, Role.TRAINABLE, Role.CONSTANT, Role.OPT_STATE, Role.HYPER):
            if name not in self.values:
                raise CompileError(f"persistent tensor {name!r} has no initial value")


class NameGen:
    """Fresh, readable, collision-free tensor names."""

    def __init__(self, taken: Iterable[str]):
        self.taken = set(taken)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}.{i}"
            i += 1
        self.taken.add(name)
        return name
