"""lightning_startwell: PyTorch Lightning callbacks that get the first steps of training right, and show what they
do."""

from lightning_startwell.callbacks import (
    CriticalPeriodMonitor,
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
    WeightDecaySchedule,
)
from lightning_startwell.data import ArrayDataModule, DigitsDataModule, MNIST1DDataModule
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.init import init_weights
from lightning_startwell.models import MLP, Classifier, ConvNet, ResNet

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "ArrayDataModule",
    "Classifier",
    "CriticalPeriodMonitor",
    "ConvNet",
    "DeficitInjector",
    "DigitsDataModule",
    "DropoutSchedule",
    "FisherTraceMonitor",
    "GradientDynamicsMonitor",
    "InitScheme",
    "MNIST1DDataModule",
    "ResNet",
    "SignalPropagationMonitor",
    "StochasticDepthSchedule",
    "WeightDecaySchedule",
    "fisher_trace",
    "init_weights",
]
