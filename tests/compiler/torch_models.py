"""Small PyTorch models of the kinds edge researchers train, written here (not in the zoo), and the harness
that exports one with either exporter and trains it in PyTorch for the parity tests.

Each model is tiny (a few thousand parameters, inputs of a few hundred values) so that exporting it with both
exporters and training it under every strategy takes seconds."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize


def _bn(channels: int, dims: int = 2) -> nn.Module:
    """BatchNorm with non-trivial running statistics and affine parameters (frozen in eval mode)."""
    bn = nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.6, 1.5)
        bn.weight.uniform_(0.7, 1.3)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise 3x3, 1x1 project, residual add."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), _bn(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), _bn(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), _bn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8), nn.ReLU6())
        self.features = nn.Sequential(InvertedResidual(8, 2))
        self.classifier = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(torch.relu(self.fc1(s))))


class MobileNetV3(nn.Module):
    """A MobileNetV3 block: HardSwish, depthwise conv, squeeze-excite with HardSigmoid, projection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8), nn.Hardswish())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), _bn(8), nn.Hardswish(),
                                   SqueezeExcite(8, 4), nn.Conv2d(8, 8, 1, bias=False), _bn(8))
        self.classifier = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class EncoderViT(nn.Module):
    """A ViT on nn.TransformerEncoderLayer (inside an nn.Sequential) with a class token."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.blocks = nn.Sequential(nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
        return self.head(self.norm(self.blocks(t))[:, 0])


class MhaBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MhaViT(nn.Module):
    """A ViT on nn.MultiheadAttention (pre-norm blocks, GELU MLP) with a class token."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.blocks = nn.Sequential(MhaBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        return self.head(self.norm(self.blocks(t))[:, 0])


class KwsNet(nn.Module):
    """A 1-D conv keyword-spotting net: conv + BN + ReLU, depthwise-separable conv, global pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.bn1 = _bn(8, dims=1)
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv1d(8, 8, 1)
        self.classifier = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.leaky_relu(self.pw(nn.functional.elu(self.dw(x))), 0.1)
        return self.classifier(x.mean(2))


class AutoEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh())
        self.decoder = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 16), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class ResidualMlp(nn.Module):
    """Split/Slice/Concat with LayerNorms; norm_a and norm_b start with identical weights (TorchScript's constant
    folding merges them into one initializer)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm_a = nn.LayerNorm(8)
        self.norm_b = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.act = nn.PReLU(8, 0.2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, b = torch.split(h, 8, dim=1)
        a = self.act(self.mix(self.norm_a(a)))
        y = torch.cat([a + self.norm_b(b), h[:, 4:12]], dim=1)
        return self.head(y)


@dataclass(frozen=True)
class Spec:
    """A test model: how to build it, its input shape (without batch), its task, and the module paths the
    selective and LoRA strategies address."""
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    task: str = "classification"          # or "reconstruction"
    selective: tuple[str, ...] = ()       # --train patterns (module paths)
    lora: tuple[str, ...] = ()            # nn.Linear module paths LoRA adapts (targets)
    head: tuple[str, ...] = ("classifier",)
    classes: int = 4
    extra: dict = field(default_factory=dict)


SPECS: dict[str, Spec] = {
    "mobilenet_v2": Spec(MobileNetV2, (3, 8, 8), selective=("features.0.conv.3", "classifier"),
                         lora=("classifier",)),
    "mobilenet_v3": Spec(MobileNetV3, (3, 8, 8), selective=("block.3.fc2", "stem.0"), lora=("classifier",)),
    "vit_encoder": Spec(EncoderViT, (5, 6), selective=("blocks.0.linear1", "norm"),
                        lora=("blocks.0.linear1", "blocks.0.linear2", "blocks.0.self_attn.out_proj"),
                        head=("head",)),
    "vit_mha": Spec(MhaViT, (5, 6), selective=("blocks.0.mlp.0", "blocks.0.norm2", "cls_token"),
                    lora=("blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.0.attn.out_proj"), head=("head",)),
    "kws": Spec(KwsNet, (4, 16), selective=("dw", "classifier"), lora=("classifier",)),
    "autoencoder": Spec(AutoEncoder, (16,), task="reconstruction", selective=("decoder.2",),
                        lora=("encoder.0", "decoder.2"), head=()),
    "residual_mlp": Spec(ResidualMlp, (8,), selective=("norm_b", "act", "mix"), lora=("inp", "mix"),
                         head=("head",)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SPECS[name].build().eval()


def export(model: nn.Module, input_shape: tuple[int, ...], dynamo: bool, opset: int, batch: int | None = None,
           folding: bool = True) -> onnx.ModelProto:
    """Export as a user would: dynamic batch unless ``batch`` is given; with the exporters' defaults, except
    that models with BatchNorm are exported without the graph optimizations that fold it into the weights."""
    x = torch.randn(2 if batch is None else batch, *input_shape)
    buffer = io.BytesIO()
    # both exporters' graph optimizations fold eval-mode BatchNorm into the convolutions' weights, which then are
    # no longer the model's parameters (the compiler warns); users who train export without them
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = None if batch is not None else ({0: torch.export.Dim("batch", min=1, max=1024)},)
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["x"],
                                        output_names=["y"], dynamic_shapes=shapes, verbose=False,
                                        optimize=not has_bn)
            return program.model_proto
        axes = None if batch is not None else {"x": {0: "batch"}}
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes, do_constant_folding=not has_bn and folding)
    return onnx.load_from_string(buffer.getvalue())


class LoraWeight(nn.Module):
    """W + scale·(A·B)ᵀ as a parametrization: every reader of the weight (F.linear inside MultiheadAttention
    too) sees the adapted weight, which is PEFT's y = x·Wᵀ + scale·x·A·B."""

    def __init__(self, a: np.ndarray, b: np.ndarray, scale: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.scale = scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.a @ self.b).T


class LoraConvWeight(LoraWeight):
    """PEFT's conv LoRA as a weight parametrization: W + scale · Σ_r B[:, r] A[r] (B's 1×1 conv after A's
    windowed conv is one conv with that weight); A (r, C, *kernel), B (M, r, 1...)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b = self.b.reshape(self.b.shape[0], self.b.shape[1])
        return w + self.scale * torch.tensordot(b, self.a, dims=1)


def add_lora(model: nn.Module, layer: str, a: np.ndarray, b: np.ndarray, scale: float) -> LoraWeight:
    module = model.get_submodule(layer)
    lora = LoraWeight(a, b, scale)
    parametrize.register_parametrization(module, "weight", lora)
    return lora


def train_torch(model: nn.Module, params: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray | None,
                steps: int, batch: int, lr: float, momentum: float, weight_decay: float) -> list[float]:
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        idx = (np.arange(batch) + step * batch) % len(x)
        xb = torch.tensor(x[idx])
        out = model(xb)
        loss = nn.functional.mse_loss(out, xb) if y is None else nn.functional.cross_entropy(out, torch.tensor(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
