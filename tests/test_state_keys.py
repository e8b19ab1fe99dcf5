"""Several instances of one callback class: each keeps its own state in a checkpoint (``state_key`` from its
constructor arguments), and checkpoints written when the state was keyed by the class name still load."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.call import _call_callbacks_load_state_dict
from torch import nn
from torch.utils.data import DataLoader

from lightning_startwell.callbacks import (
    CriticalPeriodMonitor,
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)

# Two instances of each class that differ in an argument that tells them apart (WeightDecaySchedule drives every param
# group of every optimizer: two of them would fight over the same values, and Lightning refuses the second).
PAIRS = {
    InitScheme: ({"include": ["a*"]}, {"include": ["b*"]}),
    SignalPropagationMonitor: ({"every_n_steps": 10}, {"every_n_steps": 20}),
    DropoutSchedule: ({"include": ["drop_a"]}, {"include": ["drop_b"]}),
    StochasticDepthSchedule: ({"blocks": ["a"]}, {"blocks": ["b"]}),
    FisherTraceMonitor: ({"fisher": "true"}, {"fisher": "empirical"}),
    DeficitInjector: ({"start_epoch": 0, "end_epoch": 2}, {"start_epoch": 2, "end_epoch": 4}),
    GradientDynamicsMonitor: ({"every_n_steps": 10}, {"every_n_steps": 20}),
    CriticalPeriodMonitor: ({"signal": "fisher_penalty"}, {"signal": "fisher"}),
}
N_ITEMS, N_CLASSES = 16, 4
X = torch.randn(N_ITEMS, 1, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, N_CLASSES, (N_ITEMS,), generator=torch.Generator().manual_seed(1))


class Net(pl.LightningModule):
    """Signals (N, 1, 8) and their item index; two dropout modules; ``training_step`` records what it gets."""

    def __init__(self, gamma=1.0):
        super().__init__()
        self.drop_a, self.drop_b = nn.Dropout(0.5), nn.Dropout(0.5)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(8, N_CLASSES))
        self.num_classes = N_CLASSES
        self.gamma = gamma
        self.seen = []

    def forward(self, x):
        return self.net(self.drop_b(self.drop_a(x)))

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append((self.trainer.current_epoch, self.trainer.global_step, x.clone(), y.clone(), index.clone(),
                          self.drop_a.p, self.drop_b.p))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.ExponentialLR(optimizer, self.gamma)]


def loader():
    return DataLoader(list(zip(X, Y, torch.arange(N_ITEMS), strict=True)), batch_size=8)


def trainer(root, callbacks, **kwargs):
    options = dict(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False)
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda cls: cls.__name__)
def test_two_instances_have_their_own_stable_keys_and_an_old_checkpoint_loads_into_one(cls, tmp_path):
    first, second = (cls(**arguments) for arguments in PAIRS[cls])
    assert first.state_key != second.state_key
    assert first.state_key.startswith(cls.__qualname__ + "{")
    assert cls(**PAIRS[cls][0]).state_key == first.state_key  # the same arguments, the same key (a resume finds it)
    trainer(tmp_path, [first, second])  # Lightning refuses two stateful callbacks with one key
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(tmp_path, [first, cls(**PAIRS[cls][0])])
    # A checkpoint of the old code held the single instance's state under Lightning's default key, the class name.
    old_key = pl.Callback.state_key.fget(first)
    assert old_key == cls.__qualname__
    loaded = []
    first.load_state_dict = loaded.append
    _call_callbacks_load_state_dict(types.SimpleNamespace(callbacks=[first]), {"callbacks": {old_key: {"mark": 1}}})
    assert loaded == [{"mark": 1}]


def test_two_deficit_injectors_apply_each_in_its_own_epochs(tmp_path):
    flip = DeficitInjector("vertical_flip", 0, 1, log_images=False)
    permute = DeficitInjector("label_permutation", 1, 3, seed=5, log_images=False)
    module = Net()
    trainer(tmp_path, [flip, permute], max_epochs=4).fit(module, loader())
    permutation = torch.randperm(N_CLASSES, generator=torch.Generator().manual_seed(5))
    assert sorted({epoch for epoch, *_ in module.seen}) == [0, 1, 2, 3] and len(module.seen) == 8
    for epoch, _, x, y, index, *_ in module.seen:
        assert torch.equal(x, -X[index] if epoch == 0 else X[index])  # a signal's vertical flip: mirrored about 0
        assert torch.equal(y, permutation[Y[index]] if epoch in (1, 2) else Y[index])


def test_two_dropout_schedules_drive_each_its_own_modules(tmp_path):
    early = DropoutSchedule(p=0.4, mode="early", shape="constant", cutoff_steps=3, include=["drop_a"], log_images=False)
    late = DropoutSchedule(p=0.2, mode="late", shape="constant", cutoff_steps=5, include=["drop_b"], log_images=False)
    module = Net()
    trainer(tmp_path, [early, late], max_steps=8).fit(module, loader())
    rates = [(step, a, b) for _, step, _, _, _, a, b in module.seen]
    assert rates == [(s, 0.4 if s < 3 else 0.0, 0.0 if s < 5 else 0.2) for s in range(8)]
    assert module.drop_a.p == module.drop_b.p == 0.5  # each put its modules' rates back


def _fit_with_injectors(root, windows, max_epochs, ckpt_path=None):
    injectors = [DeficitInjector("vertical_flip", start, end, log_images=False) for start, end in windows]
    run = trainer(root, injectors, max_epochs=max_epochs)
    run.fit(Net(gamma=0.5), loader(), ckpt_path=ckpt_path)
    return run, injectors


def test_a_resume_restores_each_instance_its_own_state(tmp_path):
    run, _ = _fit_with_injectors(tmp_path, [(0, 1), (1, 2)], max_epochs=2)
    run.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert set(saved) == {"DeficitInjector{'deficit': 'vertical_flip', 'windows': [(0, 1)]}",
                          "DeficitInjector{'deficit': 'vertical_flip', 'windows': [(1, 2)]}"}
    _, (first, second) = _fit_with_injectors(tmp_path, [(0, 1), (1, 2)], max_epochs=3, ckpt_path=tmp_path / "two.ckpt")
    # The learning rate at each window's onset (lr 0.1 halved every epoch) was recorded before the checkpoint only.
    assert first._onset_lr == {0: pytest.approx(0.1)} and second._onset_lr == {1: pytest.approx(0.05)}


def test_a_checkpoint_keyed_by_the_class_name_resumes_into_one_instance(tmp_path):
    run, (injector,) = _fit_with_injectors(tmp_path, [(1, 2)], max_epochs=2)
    run.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    states = checkpoint["callbacks"]
    states[pl.Callback.state_key.fget(injector)] = states.pop(injector.state_key)  # as the old code wrote it
    assert list(states) == ["DeficitInjector"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    _, (resumed,) = _fit_with_injectors(tmp_path, [(1, 2)], max_epochs=3, ckpt_path=tmp_path / "old.ckpt")
    assert resumed._onset_lr == {1: pytest.approx(0.05)}
