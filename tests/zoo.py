"""The model zoo of ``test_model_zoo.py``: twelve model families built from configs (nothing downloaded), each wrapped
in a LightningModule that follows the documented conventions (docs/own_model.md), with tiny data made here, and the
arguments each callback needs for that family (``input_key``, ``target_key``, ``mask_key``, the likelihood, the loss,
the deficit that applies)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

ITEMS, BATCH = 16, 4  # 4 training steps per epoch
CLASSES = 4
VOCAB, T = 30, 8
IGNORE = -100


def tensors_of(batch: Any) -> dict[Any, torch.Tensor]:
    """The tensors of a batch by key (dict key, or index of a tuple / namedtuple / list), cloned to the CPU."""
    if isinstance(batch, Mapping):
        items = batch.items()
    elif isinstance(batch, (tuple, list)):
        items = enumerate(batch)
    else:
        items = [(0, batch)]
    return {k: v.detach().cpu().clone() for k, v in items if isinstance(v, torch.Tensor)}


class ZooModule(pl.LightningModule):
    """What every zoo module shares: ``loss(batch)`` trains, validates and tests; every training batch is recorded
    as ``training_step`` receives it (so a test sees what a deficit changed)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[Any, torch.Tensor]] = []

    def loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        self.seen.append(tensors_of(batch))
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, weight_decay=1e-4)  # WeightDecaySchedule drives it


class ImageClassifier(ZooModule):
    """``(x, y)`` batches, ``forward(x)`` returns logits (or a Hugging Face output with ``.logits``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        out = self(x)
        return F.cross_entropy(getattr(out, "logits", out), y)


def image_loader(shape=(3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ITEMS, *shape, generator=g)
    y = torch.randint(0, CLASSES, (ITEMS,), generator=g)
    return DataLoader(list(zip(x, y, strict=True)), batch_size=BATCH)


def timm_convnext():
    import timm

    net = timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES, depths=(1, 1, 1, 1),
                            dims=(8, 16, 24, 32), drop_rate=0.1, drop_path_rate=0.1)
    return ImageClassifier(net)


def timm_vit():
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, in_chans=3,
                            num_classes=CLASSES, depth=2, embed_dim=16, num_heads=2, drop_rate=0.1,
                            drop_path_rate=0.1)
    return ImageClassifier(net)


def torchvision_mobilenet():
    import torchvision

    return ImageClassifier(torchvision.models.mobilenet_v3_small(num_classes=CLASSES, width_mult=0.25))


def torchvision_resnet():
    import torchvision
    from torchvision.models.resnet import BasicBlock

    return ImageClassifier(torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES))


def hf_vit():
    import transformers

    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=CLASSES,
                                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return ImageClassifier(transformers.ViTForImageClassification(config))


def padded_tokens(seed=0):
    """Right-padded token ids (pad 0) and their attention mask; the first sample is full length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (ITEMS,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (ITEMS, T), generator=g) * mask
    return ids, mask, torch.randint(0, CLASSES, (ITEMS,), generator=g)


class BertClassifier(ZooModule):
    """Hugging Face BERT sequence classification on dict batches (``input_ids``, ``attention_mask``, ``labels``)
    collated into a ``BatchEncoding``, as a tokenizer or ``DataCollatorWithPadding`` hands them over."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16, num_labels=CLASSES)
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)

    def loss(self, batch):
        return self.bert(**batch).loss


def bert_loader():
    import transformers

    ids, mask, labels = padded_tokens()
    items = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels, strict=True)]

    def collate(rows):
        return transformers.BatchEncoding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    return DataLoader(items, batch_size=BATCH, collate_fn=collate)


class CausalLM(ZooModule):
    """Hugging Face GPT-2 language model (``lm_head`` tied to ``wte``); ``next_tokens`` aligned with the logits,
    -100 on padding and after each sample's last token."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0)
        self.gpt = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids, attention_mask):
        return self.gpt(input_ids=input_ids, attention_mask=attention_mask)

    def loss(self, batch):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["next_tokens"].flatten(), ignore_index=IGNORE)


def gpt2_loader():
    ids, mask, _ = padded_tokens(seed=1)
    next_tokens = torch.full_like(ids, IGNORE)
    next_tokens[:, :-1] = ids[:, 1:]
    next_tokens[mask.roll(-1, 1) == 0] = IGNORE
    rows = zip(ids, mask, next_tokens, strict=True)
    items = [{"input_ids": i, "attention_mask": m, "next_tokens": t} for i, m, t in rows]
    return DataLoader(items, batch_size=BATCH)


class LSTMClassifier(ZooModule):
    """Embedding, a 2-layer LSTM (dropout between its layers), dropout and a linear head on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 16, num_layers=2, dropout=0.1, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.head(self.drop(out[:, -1]))

    def loss(self, batch):
        ids, y = batch
        return F.cross_entropy(self(ids), y)


def token_loader():
    ids, _, labels = padded_tokens(seed=2)
    return DataLoader(list(zip(ids, labels, strict=True)), batch_size=BATCH)


class UNet(ZooModule):
    """A two-level U-Net: per-pixel logits (N, C, H, W) against (N, H, W) targets, pixels labelled -100 ignored."""

    def __init__(self) -> None:
        super().__init__()

        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.down1 = conv(3, 8)
        self.down2 = nn.Sequential(nn.MaxPool2d(2), conv(8, 16), nn.Dropout2d(0.1))
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fuse = conv(16, 8)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.up(self.down2(a))
        return self.out(self.fuse(torch.cat([a, b], 1)))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, ignore_index=IGNORE)


def segmentation_loader():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(ITEMS, 3, 16, 16, generator=g)
    y = torch.randint(0, 3, (ITEMS, 16, 16), generator=g)
    y[:, :2] = IGNORE  # the top rows unlabelled
    return DataLoader(list(zip(x, y, strict=True)), batch_size=BATCH)


class MLPRegression(ZooModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)


def regression_loader():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(ITEMS, 8, generator=g)
    y = x[:, :1] * 2 + 0.1 * torch.randn(ITEMS, 1, generator=g)
    return DataLoader(list(zip(x, y, strict=True)), batch_size=BATCH)


class Sample(NamedTuple):
    image: torch.Tensor
    label: torch.Tensor


class NetWithLoss(nn.Module):
    """A model that computes its own loss when given targets, and returns a dict with ``logits`` (and ``loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Dropout(0.1))
        self.classifier = nn.Linear(32, CLASSES)

    def forward(self, image, label=None):
        logits = self.classifier(self.body(image))
        out = {"logits": logits}
        if label is not None:
            out["loss"] = F.cross_entropy(logits, label)
        return out


class OwnLossModule(ZooModule):
    """Namedtuple batches (``Sample(image, label)``, kept by the default collate), the loss computed by the model."""

    def __init__(self) -> None:
        super().__init__()
        self.model = NetWithLoss()

    def forward(self, image):
        return self.model(image)

    def loss(self, batch):
        return self.model(batch.image, batch.label)["loss"]


def namedtuple_loader():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(ITEMS, 3, 8, 8, generator=g)
    y = torch.randint(0, CLASSES, (ITEMS,), generator=g)
    return DataLoader([Sample(a, b) for a, b in zip(x, y, strict=True)], batch_size=BATCH)


class NoForward(ZooModule):
    """The common pattern: no ``forward``; ``training_step`` calls ``self.net(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(32, CLASSES))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


@dataclass
class Family:
    """A model family: how to build its module and its data, and each callback's arguments for it (a callback left
    out of ``args`` takes the defaults of ``CALLBACK_DEFAULTS``)."""

    build: Callable[[], ZooModule]
    loader: Callable[[], DataLoader]
    args: dict[str, dict[str, Any]] = field(default_factory=dict)
    deficit: str = "blur"  # the deficit that applies to this family's batches


TEXT_KEYS = ["input_ids", "attention_mask"]
EMBEDDINGS = ["*embeddings*", "*wte", "*wpe"]  # left to the model's own initialisation

FAMILIES: dict[str, Family] = {
    "timm_convnext": Family(timm_convnext, lambda: image_loader(shape=(3, 32, 32)), deficit="deprivation"),
    "timm_vit": Family(timm_vit, image_loader, {"InitScheme": {"scheme": "glorot_normal",
                                                              "exclude": ["net.patch_embed*"]}}),
    "tv_mobilenet_v3": Family(torchvision_mobilenet, image_loader, deficit="noise"),
    "tv_resnet": Family(torchvision_resnet, image_loader, {"InitScheme": {"zero_init_residual": True}}),
    "hf_bert": Family(
        BertClassifier, bert_loader,
        {
            "InitScheme": {"scheme": "glorot_normal", "input_key": TEXT_KEYS, "exclude": EMBEDDINGS},
            "FisherTraceMonitor": {"input_key": TEXT_KEYS, "target_key": "labels"},
            "DeficitInjector": {"input_key": "input_ids", "target_key": "labels", "num_classes": CLASSES},
            "GradientDynamicsMonitor": {"input_key": TEXT_KEYS, "target_key": "labels"},
            "CriticalPeriodMonitor": {"input_key": TEXT_KEYS},
        },
        deficit="label_permutation",
    ),
    "hf_gpt2": Family(
        CausalLM, gpt2_loader,
        {
            "InitScheme": {"scheme": "glorot_normal", "input_key": TEXT_KEYS, "exclude": EMBEDDINGS},
            "FisherTraceMonitor": {"input_key": TEXT_KEYS, "target_key": "next_tokens", "mask_key": "attention_mask"},
            "DeficitInjector": {"input_key": "input_ids", "target_key": "next_tokens", "num_classes": VOCAB},
            "GradientDynamicsMonitor": {"input_key": TEXT_KEYS, "target_key": "next_tokens"},
            "CriticalPeriodMonitor": {"input_key": TEXT_KEYS, "mask_key": "attention_mask"},
        },
        deficit="label_permutation",
    ),
    "hf_vit": Family(
        hf_vit, image_loader,
        {
            "InitScheme": {"scheme": "glorot_normal", "exclude": EMBEDDINGS},
            # its attention dropout is a float the attention function reads, not a module: named here
            "DropoutSchedule": {"attributes": ["*.attention.attention_dropout"]},
        },
        deficit="vertical_flip",
    ),
    "lstm_text": Family(
        LSTMClassifier, token_loader,
        {"DropoutSchedule": {"attributes": ["lstm.dropout"]}, "DeficitInjector": {"num_classes": CLASSES}},
        deficit="label_permutation",
    ),
    "unet_segmentation": Family(UNet, segmentation_loader, {"DeficitInjector": {"num_classes": 3}},
                                deficit="label_permutation"),
    "mlp_regression": Family(
        MLPRegression, regression_loader,
        {"FisherTraceMonitor": {"likelihood": "gaussian"}, "GradientDynamicsMonitor": {"loss": "mse"}},
        deficit="noise",
    ),
    "namedtuple_own_loss": Family(OwnLossModule, namedtuple_loader, deficit="noise"),
    "no_forward": Family(NoForward, lambda: image_loader(shape=(3, 8, 8))),
}
