"""LightningDataModules over real data that ships inside Python packages: nothing is ever downloaded.

* :class:`DigitsDataModule`: scikit-learn's bundled handwritten digits, 1,797 grey images of 8x8 pixels, shaped
  ``(N, 1, 8, 8)``.
* :class:`MNIST1DDataModule`: MNIST-1D (Greydanus, 2020), generated offline by the ``mnist1d`` package: 4,000 train and
  1,000 test signals of length 40, shaped ``(N, 1, 40)``.

Both split deterministically from ``seed`` and normalise with the mean and standard deviation of the training split
only, so no statistic of the validation or test data leaks into training.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_startwell._validation import check_int, check_rate


def split_sizes(num_examples: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int, int]:
    """Sizes ``(train, val, test)`` of a split of ``num_examples`` by fractions, rounded to the nearest example.

    Raises:
        ValueError: if a fraction is outside [0, 1) or the split leaves the train split, or a split asked for, empty.
    """
    check_rate("val_fraction", val_fraction)
    check_rate("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "`val_fraction` + `test_fraction` must stay below 1 to leave a train split, got"
            f" {val_fraction} + {test_fraction}."
        )
    num_val = round(num_examples * val_fraction)
    num_test = round(num_examples * test_fraction)
    num_train = num_examples - num_val - num_test
    for name, fraction, size in (("val_fraction", val_fraction, num_val), ("test_fraction", test_fraction, num_test)):
        if fraction > 0 and size == 0:
            raise ValueError(
                f"`{name}`={fraction} leaves the {name.split('_')[0]} split of {num_examples} examples empty;"
                f" use at least {1 / num_examples:.2g}."
            )
    if num_train < 1:
        raise ValueError(
            f"`val_fraction`={val_fraction} and `test_fraction`={test_fraction} leave the train split of"
            f" {num_examples} examples empty; their sum must stay below 1."
        )
    return num_train, num_val, num_test


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Standardise every tensor with the mean and standard deviation of ``train`` only (one scalar each)."""
    mean, std = train.mean(), train.std().clamp_min(1e-8)
    return tuple((x - mean) / std for x in (train, *others))


class ArrayDataModule(pl.LightningDataModule):
    """Base of the embedded datamodules: deterministic split, train-only normalisation, in-memory tensor loaders.

    Subclasses set :attr:`input_shape`, :attr:`num_classes` and :attr:`num_examples` (the size of the pool that is
    split) and implement :meth:`load_arrays`.

    Args:
        batch_size: examples per batch, for every split.
        num_workers: DataLoader worker processes (0 loads in the main process, the fastest for data this small).
        val_fraction: share of the pool held out for validation.
        test_fraction: share of the pool held out for testing; 0 where the dataset has its own test set.
        seed: seed of the split; the same seed gives the same split on every machine.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    num_examples: int
    has_own_test_set = False  # True: the test split is the dataset's own, not carved from the pool

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        split_sizes(self.num_examples, val_fraction, test_fraction)
        empty = [("val_fraction", val_fraction)] + ([] if self.has_own_test_set else [("test_fraction", test_fraction)])
        for name, fraction in empty:
            if fraction == 0:
                raise ValueError(f"`{name}`=0 leaves the {name.split('_')[0]} split empty; use a fraction in (0, 1).")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """The pool ``(x, y)`` to split, and the dataset's own test set ``(x_test, y_test)`` or None."""
        raise NotImplementedError

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_array, y_array, own_test = self.load_arrays()
        x, y = self._tensors(x_array, y_array)
        num_train, num_val, _ = split_sizes(len(x), self.val_fraction, self.test_fraction)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        # Test takes the tail of the permutation and validation the part before it, so a change of `val_fraction`
        # leaves the test split as it was.
        train_idx = order[:num_train]
        val_idx = order[num_train : num_train + num_val]
        test_idx = order[num_train + num_val :]
        x_test, y_test = self._tensors(*own_test) if own_test is not None else (x[test_idx], y[test_idx])
        x_train, x_val, x_test = standardize(x[train_idx], x[val_idx], x_test)
        self.train_set = TensorDataset(x_train, y[train_idx])
        self.val_set = TensorDataset(x_val, y[val_idx])
        self.test_set = TensorDataset(x_test, y_test)

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1, *self.input_shape)
        return x_t, torch.as_tensor(np.asarray(y), dtype=torch.long)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are asked for.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> TRAIN_DATALOADERS:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> EVAL_DATALOADERS:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> EVAL_DATALOADERS:
        return self._loader(self.test_set, shuffle=False)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's bundled handwritten digits (UCI optdigits test set): 1,797 images of 8x8 pixels, 10 classes.

    Train, validation and test are all drawn from the 1,797 images by ``seed``: with the defaults 1,257 / 270 / 270.
    Batches are ``(x, y)`` with ``x`` of shape ``(B, 1, 8, 8)``.

    Args:
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        seed: seed of the split.

    Example::

        dm = DigitsDataModule(batch_size=128, seed=1)
        trainer.fit(model, datamodule=dm)
    """

    input_shape = (1, 8, 8)
    num_classes = 10
    num_examples = 1797

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, test_fraction, seed)

    @override
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, None]:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return x, y, None


class MNIST1DDataModule(ArrayDataModule):
    """MNIST-1D (Greydanus, 2020), generated offline: 4,000 train / 1,000 test signals of length 40, 10 classes.

    The ``mnist1d`` package makes the signals from its own templates with ``data_seed`` (its default, 42, gives the
    published dataset); its 1,000 test signals are the test split, and validation is held out from the 4,000 training
    signals by ``seed`` (400 with the defaults). Batches are ``(x, y)`` with ``x`` of shape ``(B, 1, 40)``.
    ``train_size`` / ``test_size`` other than 4,000 / 1,000 generate ``train_size + test_size`` signals from the same
    templates and split them so: more training signals (a model that underfits), a larger test set (a smaller
    binomial error on a model's accuracy); the signals are then another draw than the published ones.

    Args:
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of the 4,000 training signals held out for validation.
        seed: seed of the train/validation split.
        data_seed: seed with which ``mnist1d`` generates the signals.
        train_size: training signals, validation included (4,000: the published dataset).
        test_size: test signals (1,000: the published dataset).

    Example::

        dm = MNIST1DDataModule(batch_size=128)
        trainer.fit(model, datamodule=dm)
    """

    input_shape = (1, 40)
    num_classes = 10
    num_examples = 4000
    has_own_test_set = True

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        data_seed: int = 42,
        train_size: int = 4000,
        test_size: int = 1000,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, 0.0, seed)
        check_int("train_size", train_size)
        check_int("test_size", test_size)
        self.data_seed = data_seed
        self.train_size = train_size
        self.test_size = test_size
        self.num_examples = train_size

    @override
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        arrays = _mnist1d_arrays(self.data_seed, self.train_size, self.test_size)
        x, y, x_test, y_test = (array.copy() for array in arrays)
        return x, y, (x_test, y_test)


@functools.lru_cache(maxsize=2)
def _mnist1d_arrays(
    data_seed: int, train_size: int = 4000, test_size: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D's train and test arrays, generated once per process, data seed and sizes: generating them takes
    seconds of CPU, and a study trains dozens of runs in one process. Callers get copies."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = data_seed
    if (train_size, test_size) != (4000, 1000):  # the published split: 4,000 / 1,000 of 5,000 signals
        args.num_samples = train_size + test_size
        args.train_split = train_size / args.num_samples
    # make_dataset reseeds the global `random` and NumPy generators: give the user's streams back untouched.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data: dict[str, Any] = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


__all__ = ["ArrayDataModule", "DigitsDataModule", "MNIST1DDataModule", "split_sizes", "standardize"]
