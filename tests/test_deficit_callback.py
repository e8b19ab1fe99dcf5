"""DeficitInjector under a real Trainer: which epochs see the deficit (checked inside training_step), validation
untouched, dataset unchanged, resume, DDP, YAML and bad arguments."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import ddp_spawn_flake, make_trainer, read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import DeficitInjector
from lightning_startwell.deficits import blur, class_permutation
from lightning_startwell.models import MLP

G = torch.Generator().manual_seed(0)
TRAIN_X, TRAIN_Y = torch.randn(64, 1, 8, 8, generator=G), torch.randint(0, 10, (64,), generator=G)
VAL_X, VAL_Y = torch.randn(32, 1, 8, 8, generator=G), torch.randint(0, 10, (32,), generator=G)


class Witness(MLP):
    """Records, inside training_step, whether each batch was blurred, clean or otherwise changed."""

    def __init__(self, expected_active=None):
        super().__init__(depth=1, width=16)
        self.seen: list[tuple[int, str]] = []
        self.val_clean = True
        self.expected_active = expected_active

    @staticmethod
    def _kind(x):
        """Which of the 4 fixed training batches ``x`` is, clean or blurred (a plain DataLoader restarts its epoch on a
        mid-epoch resume, so the position of the batch does not say which one it is)."""
        batches = TRAIN_X.split(16)
        if any(torch.equal(x, clean) for clean in batches):
            return "clean"
        if any(torch.allclose(x, blur(clean, 4), atol=1e-6) for clean in batches):
            return "blur"
        return "other"

    def training_step(self, batch, batch_idx):
        kind = self._kind(batch[0])
        self.seen.append((self.current_epoch, kind))
        if self.expected_active is not None:
            assert kind == ("blur" if self.current_epoch in self.expected_active else "clean")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_clean &= torch.equal(batch[0], VAL_X[batch_idx * 16 : (batch_idx + 1) * 16])
        return super().validation_step(batch, batch_idx)


def loaders():
    return (DataLoader(TensorDataset(TRAIN_X, TRAIN_Y), batch_size=16, shuffle=False),
            DataLoader(TensorDataset(VAL_X, VAL_Y), batch_size=16))


def test_deficit_exactly_on_the_chosen_epochs_and_nothing_else_touched(tmp_path):
    train_x, val_x = TRAIN_X.clone(), VAL_X.clone()
    model = Witness()
    trainer = make_trainer(tmp_path, [DeficitInjector("blur", start_epoch=[1, 3], end_epoch=[2, 4], size=4)],
                           max_epochs=5, limit_val_batches=None)
    trainer.fit(model, *loaders())
    by_epoch = {}
    for epoch, kind in model.seen:
        by_epoch.setdefault(epoch, set()).add(kind)
    assert by_epoch == {0: {"clean"}, 1: {"blur"}, 2: {"clean"}, 3: {"blur"}, 4: {"clean"}}
    assert model.val_clean
    assert torch.equal(TRAIN_X, train_x) and torch.equal(VAL_X, val_x)  # the datasets' own storage
    active = read_scalars(tmp_path / "lightning_logs")["startwell/deficit/active"]
    assert [v for _, v in active] == [float(e in (1, 3)) for e in range(5) for _ in range(4)]


def test_label_permutation_acts_on_the_targets(tmp_path):
    seen = []

    class Targets(MLP):
        def training_step(self, batch, batch_idx):
            seen.append(batch[1].clone())
            return super().training_step(batch, batch_idx)

    make_trainer(tmp_path, [DeficitInjector("label_permutation", 0, 1, seed=5)], max_epochs=2).fit(
        Targets(), loaders()[0]
    )
    perm = class_permutation(10, 5)
    assert torch.equal(seen[0], perm[TRAIN_Y[:16]])  # epoch 0, permuted
    assert torch.equal(seen[4], TRAIN_Y[:16])  # epoch 1, clean


def test_deprivation_replaces_the_inputs_by_noise_with_the_training_data_moments(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = 3.0 + 2.0 * torch.rand(64, 1, 8, 8, generator=g) ** 2  # skewed, mean and std far from 0 and 1
    seen = []

    class Record(MLP):
        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, batch[0].clone()))
            return super().training_step(batch, batch_idx)

    injector = DeficitInjector("deprivation", start_epoch=0, end_epoch=1)
    make_trainer(tmp_path, [injector], max_epochs=2).fit(
        Record(), DataLoader(TensorDataset(x, TRAIN_Y), batch_size=16, shuffle=False)
    )
    values = x.double().numpy().ravel()
    assert injector.state_dict()["moments"] == pytest.approx((values.mean(), values.std(ddof=1)), rel=1e-9)
    deprived = torch.cat([b for e, b in seen if e == 0])
    assert deprived.mean().item() == pytest.approx(values.mean(), abs=0.05)  # 4,096 draws: the mean within 4 sigma
    assert deprived.std().item() == pytest.approx(values.std(), rel=0.05)
    assert abs(torch.corrcoef(torch.stack([deprived.flatten(), x.flatten()]))[0, 1].item()) < 0.1
    assert torch.equal(torch.cat([b for e, b in seen if e == 1]), x)  # epoch 1: clean again


def test_deprivation_moments_are_those_of_the_inputs_training_step_gets(tmp_path):
    # A model that normalises on the device (Lightning's on_after_batch_transfer): the noise must have the moments of
    # the normalised inputs the deficit replaces, not of the raw dataset.
    x = 100.0 + 10.0 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    class Normalising(MLP):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return (batch[0] - 100.0) / 10.0, batch[1]

    injector = DeficitInjector("deprivation", start_epoch=0, end_epoch=1)
    make_trainer(tmp_path, [injector], max_epochs=1).fit(
        Normalising(), DataLoader(TensorDataset(x, TRAIN_Y), batch_size=16, shuffle=False)
    )
    values = ((x.double() - 100.0) / 10.0).numpy().ravel()
    assert injector.state_dict()["moments"] == pytest.approx((values.mean(), values.std(ddof=1)), rel=1e-6)


class DictOrTupleBatches(MLP):
    """Reads ``{"image", "label"}`` dict batches or ``(x, y)`` tuple batches; records the inputs and targets it trains
    on."""

    def __init__(self):
        super().__init__(depth=1, width=8)
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        assert isinstance(batch, (dict, tuple))  # the callback keeps the batch's own type
        self.seen.append((self.current_epoch, x.clone(), y.clone()))
        return super().training_step((x, y), batch_idx)


def _batches(layout):
    if layout == "dict":

        def collate(samples):
            return {"image": torch.stack([x for x, _ in samples]), "label": torch.stack([y for _, y in samples])}
    else:

        def collate(samples):
            return tuple(torch.stack(column) for column in zip(*samples, strict=True))

    return DataLoader(TensorDataset(TRAIN_X, TRAIN_Y), batch_size=16, shuffle=False, collate_fn=collate)


@pytest.mark.parametrize("layout", ["dict", "tuple"])
@pytest.mark.parametrize("deficit", ["noise", "vertical_flip"])
def test_noise_and_vertical_flip_on_dict_and_tuple_batches(tmp_path, layout, deficit):
    keys = {"input_key": "image", "target_key": "label"} if layout == "dict" else {}
    model = DictOrTupleBatches()
    injector = DeficitInjector(deficit, start_epoch=0, end_epoch=1, noise_std=0.5, **keys)
    make_trainer(tmp_path, [injector], max_epochs=2).fit(model, _batches(layout))
    during = torch.cat([x for e, x, _ in model.seen if e == 0])
    after = torch.cat([x for e, x, _ in model.seen if e == 1])
    targets = torch.cat([y for _, _, y in model.seen])
    assert torch.equal(after, TRAIN_X) and torch.equal(targets, TRAIN_Y.repeat(2))  # targets never touched
    if deficit == "vertical_flip":
        assert torch.equal(during, TRAIN_X[:, :, torch.arange(7, -1, -1), :])  # row i becomes row 7 - i
    else:
        added = (during - TRAIN_X).double()
        # 4,096 draws of N(0, 0.5^2): mean within 4 standard errors, std within 5 %, unrelated to the input.
        assert abs(added.mean().item()) < 4 * 0.5 / 64
        assert added.std().item() == pytest.approx(0.5, rel=0.05)
        assert abs(torch.corrcoef(torch.stack([added.flatten(), TRAIN_X.double().flatten()]))[0, 1].item()) < 0.1


def test_mid_epoch_resume_applies_the_deficit_on_the_same_epochs(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    make_trainer(tmp_path, [DeficitInjector("blur", 1, 3, size=4), checkpoint], max_epochs=2).fit(
        Witness(), loaders()[0]
    )
    resumed = Witness(expected_active={1, 2})
    make_trainer(tmp_path, [DeficitInjector("blur", 1, 3, size=4)], max_epochs=4).fit(
        resumed, loaders()[0], ckpt_path=tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    )
    assert resumed.seen[0] == (1, "blur") and len(resumed.seen) == 2 + 4 + 4  # rest of epoch 1, epochs 2 and 3
    assert {k for e, k in resumed.seen if e == 3} == {"clean"}


def test_warns_once_when_the_lr_has_decayed_at_removal(tmp_path):
    model = MLP(lr_scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5))
    with pytest.warns(UserWarning, match="confound"):
        make_trainer(tmp_path, [DeficitInjector("noise", 0, 2)], max_epochs=3).fit(model, loaders()[0])


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"deficit": "occlusion"}, "deficit"),
        ({"start_epoch": 3, "end_epoch": 3}, "end_epoch"),
        ({"start_epoch": -1, "end_epoch": 3}, "start_epoch"),
        ({"start_epoch": [0, 2], "end_epoch": [3]}, "start_epoch"),
        ({"start_epoch": [0, 2], "end_epoch": [3, 5]}, "overlap"),
        ({"size": 0}, "size"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"deficit": "deprived"}, "deprivation"),
    ],
)
def test_bad_arguments_at_construction(kwargs, named):
    with pytest.raises(ValueError, match=named):
        DeficitInjector(**kwargs)


class FailIfTrained(pl.Callback):
    def on_train_batch_end(self, *args):
        raise AssertionError("a training step ran")


@pytest.mark.parametrize(
    ("callback", "named"),
    [
        (DeficitInjector("blur", 0, 2, size=9), "size"),
        (DeficitInjector("blur", 0, 2, input_key="image"), "input_key"),
        (DeficitInjector("label_permutation", 0, 2, target_key=5), "target_key"),
    ],
)
def test_deficits_that_do_not_fit_the_batch_fail_before_training(tmp_path, callback, named):
    with pytest.raises(ValueError, match=named):
        make_trainer(tmp_path, [callback, FailIfTrained()], max_epochs=3).fit(MLP(), loaders()[0])


@pytest.mark.slow
@ddp_spawn_flake
def test_two_process_ddp_applies_the_deficit_on_the_same_epochs(tmp_path):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        callbacks=[DeficitInjector("blur", 1, 2, size=4)],
    )
    trainer.fit(Witness(expected_active={1}), loaders()[0])  # asserts inside training_step, on both ranks
    active = read_scalars(tmp_path / "lightning_logs")["startwell/deficit/active"]
    assert [v for _, v in active] == [0.0] * 4 + [1.0] * 4 + [0.0] * 4


class TinyTokenModel(pl.LightningModule):
    """Next-token model over a 5-token vocabulary, one target per token, padded targets at -100 (or ``pad``)."""

    num_classes = 5

    def __init__(self, ignore_index=-100):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 8)
        self.head = torch.nn.Linear(8, 5)
        self.ignore_index = ignore_index
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        self.seen.append(targets.clone())
        logits = self.head(self.embed(tokens))
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=self.ignore_index
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_loader(pad):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 5, (8, 6), generator=g)
    targets = torch.randint(0, 5, (8, 6), generator=g)
    targets[:, 4:] = pad  # right padding
    targets[0, 0] = pad
    return DataLoader(TensorDataset(tokens, targets), batch_size=4, shuffle=False), targets


@pytest.mark.parametrize("pad", [-100, 7])
def test_label_permutation_keeps_ignored_per_token_targets(tmp_path, pad):
    loader, targets = token_loader(pad)
    model = TinyTokenModel(ignore_index=pad)
    callback = DeficitInjector("label_permutation", 0, 1, seed=5, ignore_index=pad)
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, loader)
    perm = class_permutation(5, 5).tolist()
    expected = [[t if t == pad else perm[t] for t in row] for row in targets.tolist()]  # naive loop
    assert torch.cat(model.seen).tolist() == expected


@pytest.mark.parametrize("bad", [2, 0, True, 1.5, "-100"])
def test_ignore_index_is_validated(tmp_path, bad):
    with pytest.raises(ValueError, match="ignore_index"):
        callback = DeficitInjector("label_permutation", 0, 1, ignore_index=bad)
        make_trainer(tmp_path, [callback, FailIfTrained()], max_epochs=1).fit(TinyTokenModel(), token_loader(-100)[0])
