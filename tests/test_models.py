from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_startwell.models import MLP, ConvNet, ResidualBlock, ResNet, ScalarBias, ScalarScale


@pytest.mark.parametrize("cls", [MLP, ConvNet, ResNet])
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 40), (3, 5)])
def test_models_give_logits_for_images_and_signals(cls, input_shape):
    model = cls(input_shape=input_shape, num_classes=7)
    assert model(torch.randn(4, *input_shape)).shape == (4, 7)


def test_convolutions_follow_the_input_dimension():
    conv_1d = ConvNet(input_shape=(1, 40))
    conv_2d = ResNet(input_shape=(1, 8, 8))
    assert any(isinstance(m, nn.Conv1d) for m in conv_1d.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in conv_1d.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in conv_2d.modules()) == 1 + 2 * 3


def test_resnet_branches_are_named_and_add_to_the_identity():
    model = ResNet(num_blocks=4, width=8).eval()
    names = [name for name, m in model.named_modules() if name.endswith(".branch")]
    assert names == [f"blocks.{i}.branch" for i in range(4)]
    block = model.blocks[0]
    assert isinstance(block, ResidualBlock)
    x = torch.randn(2, 8, 8, 8)
    assert torch.allclose(block(x), torch.relu(x + block.branch(x)))


def test_normalisation_free_resnet_is_fixups_architecture():
    model = ResNet(num_blocks=3, width=8, norm="none", dropout=0.1)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    x = torch.randn(2, 8, 8, 8)
    branch = model.blocks[0].branch
    biases = [m.bias for m in branch if isinstance(m, ScalarBias)]
    scales = [m.scale for m in branch if isinstance(m, ScalarScale)]
    assert len(biases) == 4 and len(scales) == 1
    assert all(b.shape == () and b.item() == 0 for b in biases) and scales[0].item() == 1
    with torch.no_grad():
        for value, bias in zip((0.1, -0.2, 0.3, -0.4), biases, strict=True):
            bias.fill_(value)
        scales[0].fill_(1.5)
    convs = [m for m in branch if isinstance(m, nn.Conv2d)]
    branch.eval()
    # Zhang et al. (2019), Fig. 1 (right): each scalar bias before a conv / activation, the multiplier before the last.
    expected = convs[1](torch.relu(convs[0](x + 0.1) - 0.2) + 0.3) * 1.5 - 0.4
    assert torch.allclose(branch(x), expected, atol=1e-6)
    # The stem ends in a scalar bias and ReLU, the head puts a scalar bias before the classifier.
    assert isinstance(model.stem[1], ScalarBias) and isinstance(model.head[2], ScalarBias)


def test_mlp_layers_and_activation():
    model = MLP(depth=3, width=16, activation="leaky_relu", negative_slope=0.2, dropout=0.1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 16), (16, 16), (16, 10)]
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}


def test_default_optimizer_and_injected_schedule():
    model = MLP()
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.9
    scheduled = MLP(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.075, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.97),
    ).configure_optimizers()
    scheduler = scheduled["lr_scheduler"]["scheduler"]
    scheduler.step()
    assert scheduled["optimizer"].param_groups[0]["lr"] == pytest.approx(0.075 * 0.97)
    assert scheduled["lr_scheduler"]["interval"] == "epoch"


@pytest.mark.parametrize(
    ("cls", "kwargs", "named"),
    [
        (MLP, {"activation": "sigmoid"}, "activation"),
        (MLP, {"depth": 0}, "depth"),
        (MLP, {"dropout": 1.0}, "dropout"),
        (MLP, {"num_classes": 1}, "num_classes"),
        (MLP, {"input_shape": (8,)}, "input_shape"),
        (ConvNet, {"channels": []}, "channels"),
        (ConvNet, {"kernel_size": 4}, "kernel_size"),
        (ResNet, {"num_blocks": 0}, "num_blocks"),
        (ResNet, {"dropout": -0.1}, "dropout"),
        (ResNet, {"norm": "layer"}, "norm"),
    ],
)
def test_bad_model_arguments_name_the_argument(cls, kwargs, named):
    with pytest.raises(ValueError, match=named):
        cls(**kwargs)
