"""The callbacks on LightningModules we did not write: no `forward`, token-id batches."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import gaussian_loader, make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_startwell.callbacks import DeficitInjector, FisherTraceMonitor, InitScheme
from lightning_startwell.init import init_weights


class NoForward(pl.LightningModule):
    """The common pattern: `training_step` calls `self.net(x)`, the module itself has no `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Snapshot(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_init_scheme_without_forward_initialises_and_warns_once_how_to_get_the_ratios(tmp_path):
    model, snapshot = NoForward(), Snapshot()
    with pytest.warns(UserWarning, match="no `forward`") as record:
        make_trainer(tmp_path, [InitScheme(seed=3), snapshot], max_steps=1).fit(model, gaussian_loader())
    assert sum("no `forward`" in str(w.message) for w in record) == 1
    expected = NoForward()
    init_weights(expected, "he_normal", generator=torch.Generator().manual_seed(3))
    for name, p in expected.named_parameters():
        assert torch.equal(snapshot.params[name], p), name


@pytest.mark.parametrize(
    ("callback", "who"),
    [
        (InitScheme("lsuv", seed=0), r"InitScheme\(scheme='lsuv'\)"),
        (FisherTraceMonitor(every_n_steps=1), "FisherTraceMonitor"),
    ],
)
def test_callbacks_that_run_the_model_refuse_a_module_without_forward_at_fit_start(tmp_path, callback, who):
    model = NoForward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"{who} runs the model.*`forward`"):
        make_trainer(tmp_path, [callback], max_steps=1).fit(model, gaussian_loader())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # nothing half-applied


class TokenClassifier(pl.LightningModule):
    """Dict batches of token ids, like a Hugging Face text classifier's."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 3
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)
        self.seen_labels: list[torch.Tensor] = []

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).mean(1))

    def training_step(self, batch, batch_idx):
        self.seen_labels.append(batch["labels"].clone())
        return nn.functional.cross_entropy(self(batch["input_ids"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_loader():
    g = torch.Generator().manual_seed(0)
    items = [{"input_ids": torch.randint(0, 20, (6,), generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
    return DataLoader(items, batch_size=8)


@pytest.mark.parametrize("deficit", ["noise", "blur", "vertical_flip"])
def test_input_deficits_refuse_token_ids_before_training_naming_deficit_and_input_key(tmp_path, deficit):
    callback = DeficitInjector(deficit, 0, 1, input_key="input_ids", target_key="labels")
    with pytest.raises(ValueError, match=f"`deficit`='{deficit}'.*`input_key`='input_ids'"):
        make_trainer(tmp_path, [callback], max_steps=1).fit(TokenClassifier(), token_loader())


def test_label_permutation_applies_to_token_batches(tmp_path):
    model = TokenClassifier()
    callback = DeficitInjector("label_permutation", 0, 1, input_key="input_ids", target_key="labels", seed=1)
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, token_loader())
    permutation = torch.randperm(3, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 3
    assert torch.equal(torch.cat(model.seen_labels), permutation[labels])


def test_label_permutation_refuses_float_targets(tmp_path):
    callback = DeficitInjector("label_permutation", 0, 1, target_key=0, input_key=0, num_classes=10)
    with pytest.raises(ValueError, match="`deficit`='label_permutation'.*`target_key`=0"):
        make_trainer(tmp_path, [callback], max_steps=1).fit(NoForward(), gaussian_loader())


class NoForwardWithBatchForward(NoForward):
    """No `forward`, but the documented method that maps a batch to the model's output."""

    def startwell_forward(self, batch):
        return self.net(batch[0])


def test_startwell_forward_supplies_lsuv_the_ratios_and_the_fisher_probe(tmp_path):
    from conftest import read_scalars
    from test_fisher import naive_fisher

    # seed 1: orthogonal draws from seed 0 would be the QR of these very inputs (the loader draws them from seed 0)
    model, snapshot = NoForwardWithBatchForward(), Snapshot()
    loader = gaussian_loader(num=32, batch_size=32)
    callbacks = [
        InitScheme("lsuv", seed=1, lsuv_tol=0.05),
        FisherTraceMonitor(num_samples=32, every_n_steps=5, fisher="exact"),
        snapshot,
    ]
    make_trainer(tmp_path, callbacks, max_steps=1).fit(model, loader)
    x = next(iter(loader))[0]
    with torch.no_grad():
        z = model.net[1](x.flatten(1))
    assert abs(z.var().item() - 1) < 0.05
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert scalars["startwell/init/forward_ratio/net.1"][0][1] == pytest.approx(1.0)
    trained = NoForward()
    trained.load_state_dict(snapshot.params)
    expected = naive_fisher(trained.net, x, "exact")
    assert scalars["startwell/fisher/trace"][0] == (0, pytest.approx(sum(expected.values()), rel=1e-4))
    assert scalars["startwell/fisher/layer/net.3"][0][1] == pytest.approx(expected["3"], rel=1e-4)


class HFStyleClassifier(pl.LightningModule):
    """forward(input_ids, attention_mask) returning a dict with "logits", fed dict batches."""

    def __init__(self) -> None:
        super().__init__()
        from test_model_call import MaskedTextClassifier

        self.model = MaskedTextClassifier("dict")

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])["logits"]
        return nn.functional.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_fisher_monitor_calls_the_model_with_the_listed_keys_and_the_mask_is_used(tmp_path):
    from conftest import read_scalars
    from test_model_call import padded_batch, unpadded_loop

    torch.manual_seed(0)
    ids, mask, labels = padded_batch(n=12)
    items = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)]
    model = HFStyleClassifier()
    expected = unpadded_loop(model.model, ids, mask, "exact")
    monitor = FisherTraceMonitor(
        num_samples=12, batch_size=5, every_n_steps=10, fisher="exact", input_key=["input_ids", "attention_mask"]
    )
    make_trainer(tmp_path, [monitor], max_steps=1).fit(model, DataLoader(items, batch_size=4))
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert scalars["startwell/fisher/trace"][0] == (0, pytest.approx(sum(expected.values()), rel=1e-5))
    assert scalars["startwell/fisher/layer/model.attn"][0][1] == pytest.approx(expected["attn"], rel=1e-5)


def test_input_key_list_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(FisherTraceMonitor, "monitor")
    parser.add_class_arguments(InitScheme, "init")
    config = parser.parse_string(
        "monitor: {every_n_epochs: 1, input_key: [input_ids, attention_mask]}\ninit: {input_key: [0, 2]}"
    )
    objects = parser.instantiate_classes(config)
    assert objects.monitor.input_key == ["input_ids", "attention_mask"]
    assert objects.init.input_key == [0, 2]


@pytest.mark.parametrize("bad", [[], ["input_ids", 1], True])
def test_bad_input_keys_are_refused_at_construction(bad):
    for build in (lambda: FisherTraceMonitor(every_n_epochs=1, input_key=bad), lambda: InitScheme(input_key=bad)):
        with pytest.raises(ValueError, match="input_key"):
            build()
