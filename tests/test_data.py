from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_startwell import data
from lightning_startwell.data import DigitsDataModule, MNIST1DDataModule, split_sizes


def _set_up(dm):
    dm.setup("fit")
    return dm


@pytest.mark.usefixtures("no_network")
def test_digits_shapes_sizes_and_batches():
    dm = _set_up(DigitsDataModule(batch_size=32))
    sizes = [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sum(sizes) == 1797
    assert sizes == [1797 - 2 * round(1797 * 0.15)] + [round(1797 * 0.15)] * 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) <= 9
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10


@pytest.mark.usefixtures("no_network")
def test_mnist1d_shapes_sizes_and_labels_match_the_package():
    from mnist1d.data import get_dataset_args, make_dataset

    dm = _set_up(MNIST1DDataModule(batch_size=50))
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [3600, 400, 1000]
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (50, 1, 40)
    reference = make_dataset(get_dataset_args())
    pool_labels = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1]]).numpy()
    assert np.array_equal(np.bincount(pool_labels), np.bincount(reference["y"]))
    assert np.array_equal(dm.test_set.tensors[1].numpy(), reference["y_test"])


@pytest.mark.usefixtures("no_network")
def test_mnist1d_sizes_generate_that_many_signals_from_the_package():
    from mnist1d.data import get_dataset_args, make_dataset

    dm = _set_up(MNIST1DDataModule(train_size=6000, test_size=3000))
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [5400, 600, 3000]
    args = get_dataset_args()
    args.num_samples, args.train_split = 9000, 6000 / 9000  # the package's own split of 9,000 signals
    reference = make_dataset(args)
    assert np.array_equal(dm.test_set.tensors[1].numpy(), reference["y_test"])
    pool = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1]]).numpy()
    assert np.array_equal(np.bincount(pool), np.bincount(reference["y"]))
    for name in ("train_size", "test_size"):
        with pytest.raises(ValueError, match=name):
            MNIST1DDataModule(**{name: 0})


def test_mnist1d_leaves_global_random_streams_alone():
    data._mnist1d_arrays.cache_clear()  # generate for real
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    MNIST1DDataModule().setup("fit")
    assert np.random.rand() == expected


def test_mnist1d_is_generated_once_per_process_and_data_seed(monkeypatch):
    import mnist1d.data

    calls = []
    generate = mnist1d.data.make_dataset
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: calls.append(args.seed) or generate(args))
    data._mnist1d_arrays.cache_clear()
    first = MNIST1DDataModule(data_seed=42).load_arrays()
    first[0][:] = 0.0  # a caller writing into its arrays leaves the next caller's alone
    second, other = MNIST1DDataModule(data_seed=42).load_arrays(), MNIST1DDataModule(data_seed=3).load_arrays()
    assert calls == [42, 3]
    reference = generate(mnist1d.data.get_dataset_args())
    assert np.array_equal(second[0], reference["x"]) and np.array_equal(second[2][1], reference["y_test"])
    assert not np.array_equal(other[0], reference["x"])


@pytest.mark.parametrize("cls", [DigitsDataModule, MNIST1DDataModule])
def test_same_seed_same_split_other_seed_other_split(cls):
    a, b, c = (_set_up(cls(seed=s)) for s in (7, 7, 8))
    for split in ("train_set", "val_set", "test_set"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])


def test_digits_test_split_does_not_move_with_val_fraction():
    a, b = _set_up(DigitsDataModule(val_fraction=0.1)), _set_up(DigitsDataModule(val_fraction=0.2))
    assert torch.equal(a.test_set.tensors[1], b.test_set.tensors[1])


def test_normalisation_uses_training_statistics_only():
    """Raw digits are integers 0..16: undo the affine map that the train split pins down and every split must come
    back to integer rows of the original data, which only holds if all splits share the train statistics."""
    dm = _set_up(DigitsDataModule())
    train = dm.train_set.tensors[0].double()
    assert abs(train.mean().item()) < 1e-6 and abs(train.std().item() - 1) < 1e-5
    scale = 16.0 / (train.max() - train.min())
    shift = -train.min() * scale
    raw_rows = {tuple(row) for row in load_digits().data.astype(int)}
    for split in (dm.train_set, dm.val_set, dm.test_set):
        raw = split.tensors[0].double() * scale + shift
        assert torch.allclose(raw, raw.round(), atol=1e-3)
        rows = raw.round().long().reshape(len(raw), -1).tolist()
        assert all(tuple(r) in raw_rows for r in rows)
    val = dm.val_set.tensors[0].double()
    assert abs(val.mean().item()) > 1e-4  # not re-centred on its own mean


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"val_fraction": 0.0001}, "val_fraction"),
        ({"test_fraction": 0.0002}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_split_or_loader_arguments_are_refused_at_construction(kwargs, named):
    with pytest.raises(ValueError, match=named):
        DigitsDataModule(**kwargs)


def test_split_sizes_against_hand_counts():
    assert split_sizes(10, 0.2, 0.1) == (7, 2, 1)
    assert split_sizes(1000, 0.1) == (900, 100, 0)
    with pytest.raises(ValueError, match="empty"):
        split_sizes(3, 0.1)
