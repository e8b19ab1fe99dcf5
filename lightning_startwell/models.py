"""Demo classifiers: an MLP, a small ConvNet and a ResNet, for images ``(N, C, H, W)`` and signals ``(N, C, L)``.

Every model is a :class:`Classifier`: cross-entropy loss, torchmetrics accuracy for train/val/test logged each epoch
(``train/acc``, ``val/acc``, ``test/acc``, and ``*/loss``), optimizer and learning-rate schedule injected as callables
so that LightningCLI YAML can name any ``torch.optim`` class::

    model:
      class_path: ResNet
      init_args:
        optimizer:
          class_path: torch.optim.SGD
          init_args: {lr: 0.075, momentum: 0.9, weight_decay: 0.0005}
        lr_scheduler:
          class_path: torch.optim.lr_scheduler.ExponentialLR
          init_args: {gamma: 0.97}

Convolutions follow the input: ``input_shape`` of length 2 gives 1-D layers, of length 3 gives 2-D layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Optional, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_startwell._validation import check_choice, check_int, check_rate

Activation = Literal["relu", "leaky_relu", "tanh"]
ACTIVATIONS = ("relu", "leaky_relu", "tanh")
Norm = Literal["batch", "none"]
NORMS = ("batch", "none")


def sgd(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The default optimizer: SGD, learning rate 0.05, momentum 0.9."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def make_activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    """``relu``, ``leaky_relu`` (slope ``negative_slope``) or ``tanh`` as a module."""
    check_choice("activation", name, ACTIVATIONS)
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return nn.Tanh() if name == "tanh" else nn.ReLU()


class Classifier(pl.LightningModule):
    """Base of the demo models: loss, accuracy, logging and optimizer; subclasses build ``self.net``.

    Args:
        input_shape: shape of one example without the batch dimension, ``(C, L)`` or ``(C, H, W)``. LightningCLI
            fills it from the datamodule.
        num_classes: number of classes. LightningCLI fills it from the datamodule.
        optimizer: callable that makes the optimizer from the parameters; default SGD(lr=0.05, momentum=0.9).
        lr_scheduler: callable that makes an epoch-wise LR scheduler from the optimizer, or None for a constant LR.
    """

    net: nn.Module  # built by the subclass

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__()
        input_shape = tuple(input_shape)
        if not 2 <= len(input_shape) <= 4 or any(not isinstance(s, int) or s < 1 for s in input_shape):
            raise ValueError(
                f"`input_shape` must be (C, L), (C, H, W) or (C, D, H, W) with positive sizes, got {input_shape!r}."
            )
        check_int("num_classes", num_classes, minimum=2)
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.metrics = nn.ModuleDict(
            {f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro") for stage in ("train", "val", "test")}
        )

    @property
    def spatial_dims(self) -> int:
        """1 for signals, 2 for images, 3 for volumes."""
        return len(self.input_shape) - 1

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self._log_loss_and_accuracy(stage, loss, logits, y)
        return loss

    @torch.compiler.disable  # torchmetrics' Python counters would recompile a compiled step at every step
    def _log_loss_and_accuracy(self, stage: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        metric = cast(Metric, self.metrics[f"{stage}_acc"])
        metric(logits, y)
        self.log(
            f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "train", sync_dist=stage != "train"
        )
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log("train/loss_step", loss, on_step=True, on_epoch=False)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities of the inputs (a batch ``(x, y)``, ``(x,)`` or ``x``)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "epoch"},
        }

    def _layer(self, kind: str) -> type[nn.Module]:
        """The 1-D, 2-D or 3-D version of ``Conv``, ``BatchNorm``, ``MaxPool`` or ``AdaptiveAvgPool`` for the input."""
        suffix = f"{self.spatial_dims}d"
        return getattr(nn, f"{kind}{suffix}")


class MLP(Classifier):
    """Fully connected network: ``depth`` hidden layers of ``width`` units, each Linear -> activation -> Dropout.

    Args:
        depth: number of hidden layers.
        width: units per hidden layer.
        activation: ``relu``, ``leaky_relu`` or ``tanh``.
        negative_slope: slope of ``leaky_relu`` for negative inputs.
        dropout: dropout rate after each hidden activation (0 keeps nn.Dropout modules in place, at rate 0, so that a
            dropout schedule can drive them).
        **kwargs: ``input_shape``, ``num_classes``, ``optimizer``, ``lr_scheduler`` of :class:`Classifier`.

    Example::

        model = MLP(input_shape=(1, 8, 8), num_classes=10, depth=4, width=256, activation="tanh")
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        depth: int = 2,
        width: int = 128,
        activation: Activation = "relu",
        negative_slope: float = 0.01,
        dropout: float = 0.0,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(input_shape, num_classes, optimizer, lr_scheduler)
        check_int("depth", depth)
        check_int("width", width)
        check_rate("dropout", dropout)
        make_activation(activation, negative_slope)  # validates before anything is built
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = int(torch.Size(self.input_shape).numel())
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), make_activation(activation, negative_slope), nn.Dropout(dropout)]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)


class ConvNet(Classifier):
    """Small convolutional network: per entry of ``channels`` a Conv -> BatchNorm -> activation -> MaxPool(2) stage
    (the pooling is skipped once the signal is too short), then global average pooling, Dropout and a Linear classifier.

    Args:
        channels: output channels of each convolution stage.
        kernel_size: odd kernel size of the convolutions ('same' padding).
        activation: ``relu``, ``leaky_relu`` or ``tanh``.
        negative_slope: slope of ``leaky_relu``.
        dropout: dropout rate before the classifier.
        **kwargs: ``input_shape``, ``num_classes``, ``optimizer``, ``lr_scheduler`` of :class:`Classifier`.

    Example::

        model = ConvNet(input_shape=(1, 40), num_classes=10, channels=[32, 64, 64])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        channels: list[int] = [32, 64],  # noqa: B006 (jsonargparse reads the default from the signature)
        kernel_size: int = 3,
        activation: Activation = "relu",
        negative_slope: float = 0.01,
        dropout: float = 0.0,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(input_shape, num_classes, optimizer, lr_scheduler)
        if not channels:
            raise ValueError("`channels` must list at least one stage, got [].")
        check_int("kernel_size", kernel_size)
        for i, c in enumerate(channels):
            check_int(f"channels[{i}]", c)
        if kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd (for 'same' padding), got {kernel_size}.")
        check_rate("dropout", dropout)
        make_activation(activation, negative_slope)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        conv, norm, pool = self._layer("Conv"), self._layer("BatchNorm"), self._layer("MaxPool")
        layers: list[nn.Module] = []
        in_channels, size = self.input_shape[0], min(self.input_shape[1:])
        for out_channels in channels:
            layers += [
                conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                norm(out_channels),
                make_activation(activation, negative_slope),
            ]
            if size >= 2:
                layers.append(pool(2))
                size //= 2
            in_channels = out_channels
        layers += [
            self._layer("AdaptiveAvgPool")(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels, num_classes),
        ]
        self.net = nn.Sequential(*layers)


class ScalarBias(nn.Module):
    """Adds one learned scalar, initialised to 0 (Fixup's bias before each convolution, activation and classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ScalarScale(nn.Module):
    """Multiplies by one learned scalar, initialised to 1 (Fixup's multiplier at the end of each residual branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class ResidualBlock(nn.Module):
    """``relu(x + branch(x))``, with one of two branches:

    * ``norm="batch"``: Conv -> BatchNorm -> ReLU -> Dropout -> Conv -> BatchNorm;
    * ``norm="none"``: Fixup's normalisation-free branch (Zhang et al. 2019, Section 3): bias -> Conv -> bias -> ReLU
      -> Dropout -> bias -> Conv -> scale -> bias, with scalar biases at 0 and the scale at 1.

    The residual branch is the child module named ``branch``: initialisation schemes (Fixup, zero-init of the last
    BatchNorm) and stochastic depth find it by that name.
    """

    def __init__(self, spatial_dims: int, width: int, dropout: float, norm: Norm = "batch") -> None:
        super().__init__()
        check_choice("norm", norm, NORMS)
        conv = getattr(nn, f"Conv{spatial_dims}d")
        if norm == "batch":
            batch_norm = getattr(nn, f"BatchNorm{spatial_dims}d")
            layers = [conv(width, width, 3, padding=1, bias=False), batch_norm(width), nn.ReLU(), nn.Dropout(dropout)]
            layers += [conv(width, width, 3, padding=1, bias=False), batch_norm(width)]
        else:
            layers = [ScalarBias(), conv(width, width, 3, padding=1, bias=False), ScalarBias(), nn.ReLU()]
            layers += [nn.Dropout(dropout), ScalarBias(), conv(width, width, 3, padding=1, bias=False)]
            layers += [ScalarScale(), ScalarBias()]
        self.branch = nn.Sequential(*layers)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.branch(x))


class ResNet(Classifier):
    """Residual network: a Conv -> BatchNorm -> ReLU stem to ``width`` channels, ``num_blocks`` :class:`ResidualBlock`
    of that width (branches at ``blocks.<i>.branch``), global average pooling and a Linear classifier.

    With ``norm="none"`` there is no normalisation layer at all, as Fixup (Zhang et al. 2019) meant: the stem is
    Conv -> scalar bias -> ReLU, each branch carries Fixup's scalar biases and multiplier, and a scalar bias precedes
    the classifier. Train it with ``InitScheme(scheme="fixup")``; under ``he_normal`` alone a deep one diverges.

    Args:
        num_blocks: number of residual blocks.
        width: channels of the stem and of every block.
        dropout: dropout rate inside each residual branch.
        norm: ``batch`` (BatchNorm after every convolution) or ``none`` (Fixup's normalisation-free network).
        **kwargs: ``input_shape``, ``num_classes``, ``optimizer``, ``lr_scheduler`` of :class:`Classifier`.

    Example::

        model = ResNet(input_shape=(1, 8, 8), num_classes=10, num_blocks=8, width=32)
        fixup_ready = ResNet(num_blocks=32, norm="none")
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        num_blocks: int = 3,
        width: int = 32,
        dropout: float = 0.0,
        norm: Norm = "batch",
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(input_shape, num_classes, optimizer, lr_scheduler)
        check_int("num_blocks", num_blocks)
        check_int("width", width)
        check_rate("dropout", dropout)
        check_choice("norm", norm, NORMS)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        stem_norm = self._layer("BatchNorm")(width) if norm == "batch" else ScalarBias()
        self.stem = nn.Sequential(
            self._layer("Conv")(self.input_shape[0], width, 3, padding=1, bias=False), stem_norm, nn.ReLU()
        )
        blocks = (ResidualBlock(self.spatial_dims, width, dropout, norm) for _ in range(num_blocks))
        self.blocks = nn.Sequential(*blocks)
        head: list[nn.Module] = [self._layer("AdaptiveAvgPool")(1), nn.Flatten()]
        if norm == "none":
            head.append(ScalarBias())
        self.head = nn.Sequential(*head, nn.Linear(width, num_classes))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


__all__ = [
    "Classifier",
    "ConvNet",
    "MLP",
    "ResNet",
    "ResidualBlock",
    "ScalarBias",
    "ScalarScale",
    "make_activation",
    "sgd",
]
