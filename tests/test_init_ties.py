"""InitScheme / init_weights on tied weights (a parameter shared with an excluded module is left alone, and the report
says so), on normalisation layers without a bias, and all or nothing when something fails after the checks."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import InitScheme
from lightning_startwell.init import init_weights

VOCAB = 12


class Snapshot(Callback):
    """The parameters as training starts (after every on_fit_start), by name, the tied ones under every name."""

    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters(remove_duplicate=False)}


class TiedLM(pl.LightningModule):
    """Embedding -> Linear -> ReLU -> LayerNorm -> Linear head whose weight is the embedding's (tied, as GPT-2)."""

    def __init__(self, norm_bias=True):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16, bias=norm_bias)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            self.norm.weight.fill_(3.0)

    def forward(self, tokens):
        return self.head(self.norm(torch.relu(self.hidden(self.emb(tokens)))))

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return nn.functional.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def token_loader():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (8, 5), generator=g)
    return DataLoader(TensorDataset(tokens, tokens.roll(-1, dims=1)), batch_size=4)


def fit_and_report(tmp_path, model, init, caplog):
    snapshot = Snapshot()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, [init, snapshot], max_steps=1).fit(model, token_loader())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("InitScheme attached:")]
    assert len(lines) == 1
    return snapshot.params, lines[0]


def test_a_weight_tied_to_an_excluded_embedding_is_left_alone_and_reported(tmp_path, caplog):
    model = TiedLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    params, line = fit_and_report(tmp_path, model, InitScheme("he_normal", exclude=["emb"], seed=0), caplog)
    assert torch.equal(params["emb.weight"], before["emb.weight"])  # excluded, and not overwritten through the head
    assert torch.equal(params["head.weight"], before["emb.weight"])
    assert model.head.weight is model.emb.weight
    assert not torch.equal(params["hidden.weight"], before["hidden.weight"])
    assert params["hidden.weight"].double().std().item() == pytest.approx(math.sqrt(2 / 16), rel=0.15)
    assert "initialised (he_normal): 1 (hidden)" in line
    assert "left alone (a parameter tied to an excluded module): 1 (head (tied to emb))" in line
    assert "skipped (own parameters, not initialised): 3 (emb, norm, head)" in line


def test_a_weight_initialised_through_a_tie_is_reported_as_such(tmp_path, caplog):
    model = TiedLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    params, line = fit_and_report(tmp_path, model, InitScheme("he_normal", seed=0), caplog)
    assert not torch.equal(params["emb.weight"], before["emb.weight"])  # the head's draw, through the tie
    assert "initialised (he_normal): 2 (hidden, head)" in line
    assert "initialised through a tied weight: 1 (emb (tied to head))" in line
    assert "skipped (own parameters, not initialised): 1 (norm)" in line


def test_excluded_normalisation_layers_are_left_alone():
    model = TiedLM()
    init_weights(model, "he_normal", exclude=["norm"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.norm.weight, torch.full((16,), 3.0))
    init_weights(model, "he_normal", generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.norm.weight, torch.ones(16))


class GPT2WithValueHead(pl.LightningModule):
    """A tiny GPT-2 (built from its config, no download) with a value head: a Linear layer InitScheme initialises."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        self.gpt = transformers.GPT2LMHeadModel(config)
        self.value = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        out = self.gpt(input_ids=tokens, labels=tokens, output_hidden_states=True)
        return out.loss + self.value(out.hidden_states[-1]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_gpt2_wte_excluded_is_not_overwritten_through_its_tied_lm_head(tmp_path, caplog):
    model = GPT2WithValueHead()
    assert model.gpt.lm_head.weight is model.gpt.transformer.wte.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    init = InitScheme("he_normal", exclude=["gpt.transformer.wte"], seed=0, log_forward_ratio=False)
    params, line = fit_and_report(tmp_path, model, init, caplog)
    assert torch.equal(params["gpt.transformer.wte.weight"], before["gpt.transformer.wte.weight"])
    assert torch.equal(params["gpt.lm_head.weight"], before["gpt.transformer.wte.weight"])
    assert not torch.equal(params["value.weight"], before["value.weight"])
    assert "left alone (a parameter tied to an excluded module): 1 (gpt.lm_head (tied to gpt.transformer.wte))" in line
    # Every Linear and Conv1D (GPT-2's projections) but the tied head: c_attn, c_proj, c_fc, mlp.c_proj per block.
    initialised = line.split("initialised (he_normal): ")[1].split(";")[0]
    assert initialised.startswith(f"{2 * 4 + 1} (") and "lm_head" not in initialised
    # GPT-2 alone, through init_weights: the head is not in the report and wte is left as it was.
    wte = model.gpt.transformer.wte.weight.detach().clone()
    report = init_weights(model.gpt, "he_normal", exclude=["transformer.wte"])
    assert "lm_head" not in [layer.name for layer in report] and len(report) == 2 * 4
    assert torch.equal(model.gpt.transformer.wte.weight, wte)


def test_layer_norm_without_bias(tmp_path):
    model = TiedLM(norm_bias=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    report = init_weights(model, "he_normal", generator=torch.Generator().manual_seed(0))
    assert [layer.name for layer in report] == ["hidden", "head"]
    assert torch.equal(model.norm.weight, torch.ones(16)) and model.norm.bias is None
    assert not torch.equal(model.hidden.weight, before["hidden.weight"])
    assert torch.equal(model.hidden.bias, torch.zeros(16))


def test_a_failure_after_the_checks_leaves_every_weight_as_it_was():
    model = TiedLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}

    def failing_forward(tokens):
        model(tokens)
        raise RuntimeError("the forward pass failed")

    tokens = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="forward pass failed"):
        init_weights(model, "lsuv", lsuv_inputs=tokens, forward=failing_forward)
    for name, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, before[name]), name
