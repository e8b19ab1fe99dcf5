"""lightning_startwell: PyTorch Lightning callbacks that get the first steps of training right, and show what they do."""

from lightning_startwell.data import ArrayDataModule, DigitsDataModule, MNIST1DDataModule
from lightning_startwell.models import MLP, Classifier, ConvNet, ResNet

__version__ = "0.1.0"

__all__ = ["MLP", "ArrayDataModule", "Classifier", "ConvNet", "DigitsDataModule", "MNIST1DDataModule", "ResNet"]
