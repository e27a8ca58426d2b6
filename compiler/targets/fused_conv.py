"""Cycles of the fused LoRA convolution steps (LoraConv, LoraConvGrad), charged as the convolution GEMMs the
kernels run (each through tiling.py's GEMM model, RedMulE or cores, whichever is faster):

    LoraConv        [Y; S] = [W; A] · col(X)              one im2col of X feeds W's M rows and A's r rows
                    Y     += B · S                        a 1×1 convolution (M × r × pixels) accumulated onto Y
    LoraConvGrad    dS     = scale · Bᵀ · dY              1×1 convolution, r × M × pixels
                    dX     = col2im([W; A]ᵀ · [dY; dS])    one transposed convolution for both (only if dX)
                    dA     = dS · col(X)ᵀ                  (only if dA)
                    S      = scale · A · col(X);  dB = dY · Sᵀ     (only if dB)

The rank-r maps S and dS are charged as if they went to L2 and back (r channels of pixels, small beside the
layer's own M channels): an upper bound on what a kernel keeping them in L1 would move.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from compiler.program import Step, TensorInfo
from compiler.targets.cost import StepCost

WINDOW_ATTRS = ("strides", "pads", "dilations", "auto_pad")

CostFn = Callable[[Step, Mapping[str, TensorInfo], Mapping[str, str]], StepCost]


def cost_lora_conv(step: Step, tensors: Mapping[str, TensorInfo], levels: Mapping[str, str],
                   cost_gemm: CostFn) -> StepCost:
    """The step's cost as the sum of its GEMM parts; ``cost_gemm`` costs one plain Conv/ConvGrad* step."""
    parts = _Parts(step, tensors, levels)
    if step.op == "LoraConv":
        x, w, a, b = step.inputs[:4]
        y = step.outputs[0]
        stacked = parts.stack(w, a, axis=0)
        ys = parts.stack(y, parts.like(y, channels=parts.rank(a)), axis=1)
        s = parts.like(y, channels=parts.rank(a))
        steps = [parts.step("Conv", (x, stacked, *step.inputs[4:]), ys, window=True),
                 parts.step("Conv", (s, b), y)]
    else:
        dy, x, w, a, b = step.inputs
        grads = dict(zip(step.attrs["grads"], step.outputs))
        r = parts.rank(a)
        ones = (1,) * (len(parts.shape(w)) - 2)
        bt = parts.tensor(f"{b}.T", (r, parts.channels(w), *ones), like=b)   # Bᵀ as a 1×1 convolution
        ds = parts.like(dy, channels=r)
        steps = [parts.step("Conv", (dy, bt), ds)]
        if "x" in grads:
            steps.append(parts.step("ConvGradInput", (parts.stack(dy, ds, axis=1), parts.stack(w, a, axis=0)),
                                    grads["x"], window=True, shape=parts.shape(x)))
        if "a" in grads:
            steps.append(parts.step("ConvGradWeight", (x, ds), grads["a"], window=True,
                                    kernel_shape=parts.shape(w)[2:]))
        if "b" in grads:
            s = parts.like(dy, channels=r)
            steps += [parts.step("Conv", (x, parts.unstacked(a)), s, window=True),
                      parts.step("ConvGradWeight", (s, dy), grads["b"], kernel_shape=ones)]
    costs = [cost_gemm(s, parts.tensors, parts.levels) for s in steps]
    return _sum(step, costs)


class _Parts:
    """Synthetic tensors and steps for the GEMM parts of one fused step (a per-device A/B counts once per device:
    its product runs over that device's samples, so the totals equal one product over all of them)."""

    def __init__(self, step: Step, tensors: Mapping[str, TensorInfo], levels: Mapping[str, str]):
        self.base = step
        self.tensors = dict(tensors)
        self.levels = dict(levels)
        self.count = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def channels(self, w: str) -> int:
        return self.shape(w)[0]

    def per_device(self, a: str, w: str) -> bool:
        return len(self.shape(a)) == len(self.shape(w)) + 1

    def rank(self, a: str) -> int:
        w_rank = len(self.shape(self.base.inputs[1 if self.base.op == "LoraConv" else 2]))
        return self.shape(a)[len(self.shape(a)) - w_rank]

    def tensor(self, hint: str, shape: tuple[int, ...], like: str | None = None) -> str:
        self.count += 1
        name = f"{self.base.name}/{hint}#{self.count}"
        ref = self.tensors[like] if like else next(iter(self.tensors.values()))
        self.tensors[name] = TensorInfo(name, tuple(int(d) for d in shape), "float32", ref.role, ref.level)
        self.levels[name] = self.levels.get(like, "L2") if like else "L2"
        return name

    def unstacked(self, p: str) -> str:
        """A per-device A or B without its device axis (one device's factor)."""
        w = self.base.inputs[1 if self.base.op == "LoraConv" else 2]
        if not self.per_device(p, w):
            return p
        return self.tensor(p, self.shape(p)[1:], like=p)

    def like(self, y: str, channels: int) -> str:
        shape = self.shape(y)
        return self.tensor(f"{y}.r", (shape[0], channels, *shape[2:]), like=y)

    def stack(self, p: str, q: str, axis: int) -> str:
        ps, qs = self.shape(p), self.shape(self.unstacked(q))
        shape = tuple(d + qs[i] if i == axis else d for i, d in enumerate(ps))
        return self.tensor(f"{p}+", shape, like=p)

    def step(self, op: str, inputs: tuple[str, ...], output: str, window: bool = False, **attrs) -> Step:
        if window:
            attrs.update({k: v for k, v in self.base.attrs.items() if k in WINDOW_ATTRS})
        return dataclasses.replace(self.base, name=f"{self.base.name}/{op}", op=op,
                                   inputs=tuple(self.unstacked(i) for i in inputs), outputs=(output,), attrs=attrs)


def _sum(step: Step, costs: list[StepCost]) -> StepCost:
    main = max(costs, key=lambda c: c.cycles)
    links: dict[str, int] = {}
    for c in costs:
        for link, n in c.bytes_by_link.items():
            links[link] = links.get(link, 0) + n
    return StepCost(step.name, step.op, "conv", main.unit, sum(c.cycles for c in costs),
                    compute_cycles=sum(c.compute_cycles for c in costs), setup_cycles=sum(c.setup_cycles for c in costs),
                    dma_cycles=sum(c.dma_cycles for c in costs), tiles=sum(c.tiles for c in costs), tile=main.tile,
                    l1_bytes=max(c.l1_bytes for c in costs), bytes_by_link=links, macs=sum(c.macs for c in costs))
