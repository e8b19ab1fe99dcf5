"""Stochastic depth on transformer layers without surgery: per-branch drop-path on the layers of known families
(BERT, GPT-2, HF ViT, nn.TransformerEncoderLayer), LayerDrop on named layers of other families; drop frequencies per
layer against the rule."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_startwell.callbacks import StochasticDepthSchedule
from lightning_startwell.drop_path import DropPathHooks, find_residual_blocks
from lightning_startwell.schedules import block_drop_rates

transformers = pytest.importorskip("transformers")
LAYERS, RATE, PASSES, BATCH = 4, 0.6, 10, 200


def bert():
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config), lambda: {"input_ids": torch.randint(0, 30, (BATCH, 6))}


def gpt2():
    config = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=16, n_layer=LAYERS, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2Model(config), lambda: {"input_ids": torch.randint(0, 30, (BATCH, 6))}


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTModel(config), lambda: {"pixel_values": torch.randn(BATCH, 1, 8, 8)}


def torch_encoder():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False), lambda: (torch.randn(BATCH, 6, 16),)


def count_dropped(model, blocks, inputs):
    """Per block, the share of samples whose branch outputs are all zero after the hooks (every branch call counted),
    over ``PASSES`` training forwards."""
    dropped = {b.name: [0, 0] for b in blocks}
    modules = dict(model.named_modules())

    def counter(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            zero = (out.flatten(1) == 0).all(1)
            dropped[name][0] += int(zero.sum())
            dropped[name][1] += len(zero)
        return hook

    handles = [modules[o].register_forward_hook(counter(b.name)) for b in blocks for o in b.outputs]
    for _ in range(PASSES):
        args = inputs()
        model(**args) if isinstance(args, dict) else model(*args)
    for h in handles:
        h.remove()
    return [dropped[b.name][0] / dropped[b.name][1] for b in blocks]


@pytest.mark.parametrize(
    ("build", "layer_names", "branches"),
    [
        (bert, "encoder.layer.{}", ("attention.output.dropout", "output.dropout")),
        (gpt2, "h.{}", ("attn", "mlp")),
        (vit, "layers.{}", ("dropout",)),
        (torch_encoder, "layers.{}", ("dropout1", "dropout2")),
    ],
    ids=["bert", "gpt2", "hf_vit", "torch_encoder"],
)
def test_known_transformer_layers_are_dropped_per_branch_at_the_rule(build, layer_names, branches):
    torch.manual_seed(0)
    model, inputs = build()
    blocks = find_residual_blocks(model)
    assert [b.name for b in blocks] == [layer_names.format(i) for i in range(LAYERS)]
    assert all(b.drop == "branch" for b in blocks)
    assert [b.outputs for b in blocks] == [tuple(f"{b.name}.{r}" for r in branches) for b in blocks]
    hooks = DropPathHooks(model.train(), blocks).attach()
    rates = block_drop_rates(RATE, LAYERS, "linear")  # Huang: block l drops with (l / L) x 0.6
    hooks.set_rates(rates)
    measured = count_dropped(model, blocks, inputs)
    hooks.detach()
    assert measured == pytest.approx(rates, abs=0.035)  # binomial sd <= 0.008 per block at 2,000+ draws


def test_kept_branches_are_scaled_by_one_over_survival():
    torch.manual_seed(0)
    model, inputs = torch_encoder()
    blocks = find_residual_blocks(model)
    layer = model.layers[0]
    x = inputs()[0]
    with torch.no_grad():
        reference = layer.dropout1(layer._sa_block(layer.norm1(x) if layer.norm_first else x, None, None))
    seen = []
    hooks = DropPathHooks(model.train(), blocks[:1]).attach()
    handle = layer.dropout1.register_forward_hook(lambda m, a, out: seen.append(out))  # after the drop: sees it
    hooks.set_rates([0.25])
    with torch.no_grad():
        layer(x)
    hooks.detach()
    handle.remove()
    kept = ~(seen[0].flatten(1) == 0).all(1)
    assert kept.any() and not kept.all()  # both kinds of sample seen
    assert torch.allclose(seen[0][kept], reference[kept] / 0.75, atol=1e-6)


class Stack(nn.Module):
    """Layers of a family the library does not know: named by their container, they are dropped whole."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_named_container_of_unknown_layers_is_layer_drop_at_the_rule():
    torch.manual_seed(0)
    model = Stack().train()
    blocks = find_residual_blocks(model, ["layers"])
    assert [(b.name, b.drop) for b in blocks] == [(f"layers.{i}", "layer") for i in range(LAYERS)]
    hooks = DropPathHooks(model, blocks).attach()
    rates = block_drop_rates(RATE, LAYERS, "linear")
    hooks.set_rates(rates)
    passed_on = {i: [0, 0] for i in range(LAYERS)}

    def counter(i):
        def hook(module, args, output):
            same = (output == args[0]).all(1)  # the layer's input passed on unchanged: dropped, no rescaling
            passed_on[i][0] += int(same.sum())
            passed_on[i][1] += len(same)
        return hook

    handles = [model.layers[i].register_forward_hook(counter(i)) for i in range(LAYERS)]
    for _ in range(PASSES):
        model(torch.randn(BATCH, 8))
    for h in handles + hooks._handles:
        h.remove()
    assert [passed_on[i][0] / passed_on[i][1] for i in range(LAYERS)] == pytest.approx(rates, abs=0.035)


def test_schedule_on_bert_reports_per_branch_and_removes_its_hooks(tmp_path, caplog):
    import logging

    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.bert = bert()[0]
            self.head = nn.Linear(16, 2)

        def training_step(self, batch, batch_idx):
            hidden = self.bert(input_ids=batch["input_ids"]).last_hidden_state
            return nn.functional.cross_entropy(self.head(hidden[:, 0]), batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    items = [{"input_ids": torch.randint(0, 30, (6,)), "label": torch.tensor(i % 2)} for i in range(16)]
    schedule = StochasticDepthSchedule(drop_rate=0.5, blocks=["bert.encoder.layer"])
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, [schedule], max_steps=3).fit(module, DataLoader(items, batch_size=4))
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("StochasticDepthSchedule"))
    assert f"{LAYERS} per branch (drop-path" in report and "LayerDrop" not in report
    assert "bert.encoder.layer.0.attention.output.dropout, bert.encoder.layer.0.output.dropout" in report
    assert all(not m._forward_hooks for m in module.modules())
