"""DropoutSchedule drives the attention-dropout probabilities that attention functions read as floats (Hugging Face
ViT's ``attention_dropout``, ``nn.MultiheadAttention.dropout``), reports them, and restores them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer, read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import DropoutSchedule
from lightning_startwell.dropout import find_dropout

transformers = pytest.importorskip("transformers")


def tiny_vit(attention_rate=0.3):
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=attention_rate,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def attention_floats(model):
    return {n: m.attention_dropout for n, m in model.named_modules() if hasattr(m, "attention_dropout")}


def test_vit_attention_dropout_is_found_and_is_what_the_attention_reads():
    model = tiny_vit().train()
    slots = {s.name: s for s in find_dropout(model)}
    floats = attention_floats(model)
    assert len(floats) == 2 and all(v == 0.3 for v in floats.values())
    assert {f"{n}.attention_dropout" for n in floats} <= set(slots)
    assert all(slots[f"{n}.attention_dropout"].kind == "attention" for n in floats)

    x = torch.randn(4, 1, 8, 8)
    hidden_off = [s for s in slots.values() if s.kind == "module"]  # the nn.Dropout modules, set to 0
    for slot in hidden_off:
        slot.set(0.0)
    torch.manual_seed(1)
    varied = model(pixel_values=x).logits
    torch.manual_seed(2)
    assert not torch.allclose(varied, model(pixel_values=x).logits)  # only the attention dropout is left to vary
    for slot in slots.values():
        slot.set(0.0)
    torch.manual_seed(1)
    first = model(pixel_values=x).logits
    torch.manual_seed(2)
    assert torch.equal(first, model(pixel_values=x).logits)  # with the floats at 0 the training forward is fixed


def test_multihead_attention_dropout_is_an_attention_rate():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.2)
    kinds = {s.name: s.kind for s in find_dropout(layer)}
    assert kinds["self_attn.dropout"] == "attention"
    assert sorted(n for n, k in kinds.items() if k == "module") == ["dropout.p", "dropout1.p", "dropout2.p"]


class VitModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_vit()
        self.seen = []

    def forward(self, x):
        return self.model(pixel_values=x).logits

    def training_step(self, batch, batch_idx):
        self.seen.append(sorted(set(attention_floats(self.model).values())))
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_schedule_drives_and_restores_the_vit_attention_dropout(tmp_path, caplog):
    import logging

    module = VitModule()
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    schedule = DropoutSchedule(p=0.2, mode="early", shape="constant", cutoff_steps=2)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, [schedule], max_steps=4).fit(module, DataLoader(data, batch_size=4))
    assert module.seen == [[0.2], [0.2], [0.0], [0.0]]  # the floats the attention reads, step by step
    assert set(attention_floats(module.model).values()) == {0.3}  # restored at the end of fit
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("DropoutSchedule attached"))
    names = ", ".join(f"model.{n}.attention_dropout" for n in attention_floats(module.model))
    assert f"attention dropout probabilities: 2 ({names})" in report
    rates = [v for _, v in read_scalars(tmp_path / "lightning_logs")["startwell/dropout/rate"]]
    assert rates[:1] == pytest.approx([0.2])
