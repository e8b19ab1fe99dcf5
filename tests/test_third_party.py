"""Third-party models built from configs (nothing downloaded): Hugging Face BERT (padded dict batches) and a GPT-2
causal LM, the Fisher trace against float64 per-sample loops that use the attention mask; timm ViT and torchvision
ResNet; each with every callback that applies under a real Trainer.fit."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import gaussian_loader, make_trainer, read_scalars
from test_fisher_sequences import model_draws, per_position_loop
from torch import nn
from torch.utils.data import DataLoader

from lightning_startwell.callbacks import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.models import Classifier

transformers = pytest.importorskip("transformers")

VOCAB, N, T = 40, 6, 7


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, initializer_range=0.5,  # weights large enough that padding matters
    )
    return transformers.BertForSequenceClassification(config)


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def padded(n=N, seed=0):
    """Right-padded token ids (pad 0), their attention mask, class labels, and next-token targets (-100 on padding
    and at each sample's last token)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, T), generator=g) * mask
    next_tokens = torch.full((n, T), -100)
    next_tokens[:, :-1] = ids[:, 1:]
    next_tokens[mask.roll(-1, 1) == 0] = -100
    return ids, mask, torch.randint(0, 3, (n,), generator=g), next_tokens


def bert_loop(model, ids, mask, fisher, labels):
    """Float64 per-sample trace of a sequence classifier, each sample run alone with its own attention mask."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    total = 0.0
    for i in range(len(ids)):
        log_probs = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits.log_softmax(-1)[0]
        pairs = [(c, log_probs[c].exp().item()) for c in range(3)] if fisher == "exact" else [(int(labels[i]), 1.0)]
        for c, weight in pairs:
            grads = torch.autograd.grad(log_probs[c], list(params.values()), retain_graph=True)
            total += weight * sum(g.square().sum().item() for g in grads)
    return total / len(ids)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_bert_fisher_with_the_attention_mask_equals_a_float64_loop(fisher):
    torch.manual_seed(0)
    model = bert()
    ids, mask, labels, _ = padded()
    ours = fisher_trace(model, {"input_ids": ids, "attention_mask": mask}, fisher=fisher, targets=labels, chunk_size=4)
    assert ours.total == pytest.approx(bert_loop(model, ids, mask, fisher, labels), rel=1e-5)
    assert sum(ours.per_layer.values()) == pytest.approx(ours.total, rel=1e-12)
    unmasked = fisher_trace(model, ids, fisher=fisher, targets=labels)  # the padding attended to: another function
    assert unmasked.total != pytest.approx(ours.total, rel=0.01)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_gpt2_per_token_fisher_with_padding_left_out_equals_a_float64_loop(fisher):
    torch.manual_seed(1)
    model = gpt2()
    ids, mask, _, next_tokens = padded(seed=1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    ours = fisher_trace(model, inputs, fisher=fisher, targets=next_tokens, mask=mask,
                        generator=torch.Generator().manual_seed(0))
    if fisher == "true":
        labels = model_draws(model, inputs, logits=lambda m, x: m(**x).logits).masked_fill(mask == 0, -100)
    else:
        labels = next_tokens
    reference = per_position_loop(model, ids, mask, fisher, labels, logits=lambda m, x: m(input_ids=x).logits)
    assert ours.total == pytest.approx(sum(reference.values()), rel=1e-5)


class HuggingFaceModule(pl.LightningModule):
    """A LightningModule around a Hugging Face model on dict batches; its forward returns the ``ModelOutput``."""

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        labels = batch["next_tokens" if self.causal else "labels"]
        return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def token_loader(n=16):
    ids, mask, labels, next_tokens = padded(n=n)
    items = [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i], "next_tokens": next_tokens[i]}
        for i in range(n)
    ]
    return DataLoader(items, batch_size=4)


def assert_logged(root, prefixes):
    """Every prefix has at least one tag, and every value under the prefixes is finite."""
    scalars = read_scalars(root / "lightning_logs")
    for prefix in prefixes:
        tags = [t for t in scalars if t.startswith(prefix)]
        assert tags, (prefix, sorted(scalars))
        assert all(math.isfinite(v) for t in tags for _, v in scalars[t]), prefix
    return scalars


def text_callbacks(causal):
    keys = ["input_ids", "attention_mask"]
    fisher = FisherTraceMonitor(num_samples=8, batch_size=4, every_n_steps=2, input_key=keys,
                                mask_key="attention_mask" if causal else None)
    return [
        InitScheme("glorot_normal", input_key=keys, exclude=["*embeddings*", "*wte", "*wpe"]),
        SignalPropagationMonitor(every_n_steps=2),
        DropoutSchedule(p=0.2, mode="early", cutoff_steps=2),
        fisher,
        # Per-token cross-entropy for the causal LM (aligned next-token targets, padding masked), per sample for BERT.
        GradientDynamicsMonitor(num_batches=2, batch_size=4, every_n_steps=2, input_key=keys,
                                target_key="next_tokens" if causal else "labels",
                                mask_key="attention_mask" if causal else None),
    ]


@pytest.mark.parametrize("causal", [False, True], ids=["bert", "gpt2"])
def test_hugging_face_models_with_every_callback_that_applies(tmp_path, causal):
    torch.manual_seed(2)
    module = HuggingFaceModule(gpt2() if causal else bert(), causal)
    callbacks = text_callbacks(causal)
    if not causal:
        callbacks.append(DeficitInjector("label_permutation", start_epoch=0, end_epoch=1, num_classes=3,
                                         input_key="input_ids", target_key="labels"))
    make_trainer(tmp_path, callbacks, max_steps=4).fit(module, token_loader())
    prefixes = ["startwell/init/", "startwell/signal/", "startwell/dropout/", "startwell/fisher/trace"]
    prefixes.append("startwell/dynamics/direction_error")
    scalars = assert_logged(tmp_path, prefixes + ([] if causal else ["startwell/deficit/"]))
    assert [s for s, _ in scalars["startwell/fisher/trace"]] == [0, 2, 4]
    assert [v for _, v in scalars["startwell/dropout/rate"]][-1] == 0.0  # early dropout off after the cutoff


@pytest.mark.slow
def test_timm_vit_with_every_callback_that_applies(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=10,
                            depth=2, drop_path_rate=0.0, in_chans=1, embed_dim=16, num_heads=2)
    module = Classifier(input_shape=(1, 16, 16), num_classes=10)
    module.net = vit
    callbacks = [
        InitScheme("glorot_normal", exclude=["net.patch_embed*"]),
        SignalPropagationMonitor(every_n_steps=2),
        DropoutSchedule(p=0.1, mode="late", shape="constant", cutoff_steps=2),
        StochasticDepthSchedule(drop_rate=0.2),
        FisherTraceMonitor(num_samples=8, every_n_steps=2),
        DeficitInjector("blur", start_epoch=0, end_epoch=1, size=4),
    ]
    make_trainer(tmp_path, callbacks, max_steps=4).fit(module, gaussian_loader(num=32, shape=(1, 16, 16), batch_size=8))
    assert_logged(tmp_path, ["startwell/init/", "startwell/signal/", "startwell/dropout/", "startwell/depth/",
                             "startwell/fisher/trace", "startwell/deficit/"])


@pytest.mark.slow
def test_torchvision_resnet_with_every_callback_that_applies(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    module = Classifier(input_shape=(3, 16, 16), num_classes=10)
    module.net = torchvision.models.resnet18(num_classes=10)
    callbacks = [
        InitScheme("he_normal", zero_init_residual=True),
        SignalPropagationMonitor(every_n_steps=2),
        StochasticDepthSchedule(drop_rate=0.2),
        FisherTraceMonitor(num_samples=8, every_n_steps=2),
        DeficitInjector("noise", start_epoch=0, end_epoch=1, noise_std=0.5),
    ]
    make_trainer(tmp_path, callbacks, max_steps=3).fit(module, gaussian_loader(num=24, shape=(3, 16, 16), batch_size=8))
    assert_logged(tmp_path, ["startwell/init/", "startwell/signal/", "startwell/depth/", "startwell/fisher/trace",
                             "startwell/deficit/"])
