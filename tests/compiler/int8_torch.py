"""A PyTorch reference of edgefleet's int8 graph (compiler/ops/quantized.py), written from the arithmetic, not
from the numpy code: the forward in integers held in float32 tensors (every sum of int8 products here stays
below 2^24, so float32 convolutions are exact), requantization with torch.round (half to even); the backward
by autograd through a straight-through requantization (TTE's _QuantizedConv2dFunc: dacc = dy·m, zero where
the output saturated); QAS as TTE's SGDScale.pre_step; the integer update p = clamp(p + round(−lr·g)).

``QuantizedTorch(program)`` reads the program's quantized parameters and its forward steps' attributes (the
graph: which layer feeds which, with which window and zero points) and nothing of its backward or update."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

QMIN, QMAX = -128, 127


class _Requant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acc, m, zero):
        y = torch.clamp(torch.round(acc * m) + zero, QMIN, QMAX)
        ctx.save_for_backward(y, m)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, m = ctx.saved_tensors
        return dy * m * ((y > QMIN) & (y < QMAX)), None, None


def _conv_window(attrs, rank):
    pads = attrs.get("pads") or (0,) * (2 * rank)
    top, left, bottom, right = pads if rank == 2 else (0, pads[0], 0, pads[1])
    return top, left, bottom, right


class QuantizedTorch:
    def __init__(self, program, values=None):
        values = values or program.values
        self.program = program
        self.params = {n: torch.tensor(np.asarray(v).astype(np.float32), requires_grad=program.tensors[n].role == "trainable")
                       for n, v in values.items()}
        self.steps = [s for s in program.evaluate.steps if s.op != "SoftmaxCrossEntropy"]

    def forward(self, x: np.ndarray) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {self.program.input: torch.tensor(x, dtype=torch.float32)}
        p = self.params
        for s in self.steps:
            a = s.attrs
            ins = [env[i] if i in env else p[i] for i in s.inputs]
            if s.op == "Quantize":
                y = torch.clamp(torch.round(ins[0] / torch.tensor(a["scale"], dtype=torch.float32))
                                + a["zero_point"], QMIN, QMAX)
            elif s.op == "QConv":
                x_, w, b, m = ins
                rank = x_.dim() - 2
                top, left, bottom, right = _conv_window(a, rank)
                xc = x_ - a["x_zero"]
                if rank == 1:
                    xc, w = xc.unsqueeze(2), w.unsqueeze(2)
                xc = F.pad(xc, (left, right, top, bottom))
                acc = F.conv2d(xc, w, None, tuple(a.get("strides") or (1, 1))[-2:] if rank == 2 else (1, a["strides"][0]),
                               0, tuple(a.get("dilations") or (1, 1)), a.get("group", 1))
                if rank == 1:
                    acc = acc.squeeze(2)
                acc = acc + b.view(1, -1, *(1,) * rank)
                y = _Requant.apply(acc, m.view(1, -1, *(1,) * rank), float(a["y_zero"]))
            elif s.op == "QLinear":
                x_, w, b, m = ins
                acc = (x_ - a["x_zero"]) @ w.T + b
                y = acc * m if a["output"] == "float32" else _Requant.apply(acc, m, float(a["y_zero"]))
            elif s.op == "QGlobalAveragePool":
                x_ = ins[0]
                total = x_.sum(dim=tuple(range(2, x_.dim())), keepdim=True)
                y = torch.clamp(torch.round(total / float(np.prod(x_.shape[2:]))), QMIN, QMAX)
                y = _MeanSTE.apply(x_, y)
            elif s.op in ("Reshape", "Flatten"):
                y = ins[0].reshape(self.program.tensors[s.outputs[0]].shape)
            else:
                raise NotImplementedError(s.op)
            env[s.outputs[0]] = y
        return env

    def train_step(self, x: np.ndarray, labels: np.ndarray, lr: float, qas: bool, master: dict | None = None):
        """One SGD step of the program's trainable parameters; returns (loss, QAS-scaled gradients, new values)."""
        env = self.forward(x)
        loss = F.cross_entropy(env[self.program.output], torch.tensor(labels, dtype=torch.int64))
        loss.backward()
        grads, new = {}, {}
        for name, t in self.params.items():
            if not t.requires_grad:
                continue
            spec = self.program.tensors[name]
            k = self._channels(name, t.shape[0])
            g = t.grad[:k]
            if qas:
                factor = self._qas(name)[:k]
                g = g * factor.view(-1, *(1,) * (g.dim() - 1))
            grads[name] = g
            step = g * torch.tensor(lr, dtype=torch.float32)
            lo, hi = (QMIN, QMAX) if spec.dtype == "int8" else (-(2 ** 31), 2 ** 31 - 1)
            value = t.detach().clone().double()
            if master is not None and name in master:
                master[name] = master[name] - step
                value[:k] = torch.clamp(torch.round(master[name]), lo, hi).double()
            else:
                value[:k] = torch.clamp(value[:k] + torch.round(-step).double(), lo, hi)
            new[name] = value
        return float(loss), grads, new

    def _qas(self, name: str) -> torch.Tensor:
        """TTE's SGDScale.pre_step from the layer's scales: w_scale = m·s_y/s_x (m·1/s_x for float logits);
        weight gradient / w_scale², bias gradient / (w_scale·s_x)²."""
        layer, kind = name.rsplit(".", 1)
        info = next(e for e in self.program.report["int8"]["layers"] if e["layer"] == layer)
        m = torch.tensor(np.asarray(self.program.values[f"{layer}.requant"]), dtype=torch.float64)
        sx, sy = info["x_scale"], info["y_scale"] or 1.0
        w_scale = m * sy / sx
        factor = 1.0 / w_scale ** 2 if kind == "weight" else 1.0 / (w_scale * sx) ** 2
        return factor.float()

    def _channels(self, name: str, full: int) -> int:
        for s in self.program.train.steps:
            if s.op == "QSGD" and s.inputs[0] == name:
                return int(s.attrs["channels"]) or full
        return full


class _MeanSTE(torch.autograd.Function):
    """Forward: the rounded mean already computed; backward: the mean's gradient (dy / plane size)."""
    @staticmethod
    def forward(ctx, x, y):
        ctx.shape = x.shape
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        plane = float(np.prod(ctx.shape[2:]))
        return dy.expand(ctx.shape) / plane, None
