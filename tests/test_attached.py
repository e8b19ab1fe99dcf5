"""Each callback says once, at fit start, what it attached to: one rank-zero line on the `lightning.pytorch` logger and
the same text in TensorBoard at `<prefix>/attached`; the facts checked against the model, read back from both."""

from __future__ import annotations

import logging
import re

from conftest import gaussian_loader, make_trainer

from lightning_startwell.callbacks import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)
from lightning_startwell.models import ResNet

PREFIXES = {
    "InitScheme": "startwell/init",
    "SignalPropagationMonitor": "startwell/signal",
    "DropoutSchedule": "startwell/dropout",
    "StochasticDepthSchedule": "startwell/depth",
    "FisherTraceMonitor": "startwell/fisher",
    "DeficitInjector": "startwell/deficit",
    "GradientDynamicsMonitor": "startwell/dynamics",
}


def read_texts(log_dir):
    """Every text summary of the TensorBoard event files under ``log_dir``, as ``{tag: [text, ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = {}
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            values = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
            texts.setdefault(tag.removesuffix("/text_summary"), []).extend(values)
    return texts


def count(text, fact):
    """The number in ``<fact>: <number> (...)`` of a report line."""
    return int(re.search(re.escape(fact) + r"[^:]*: (\d+)", text).group(1))


def test_every_callback_says_once_what_it_attached_to(tmp_path, caplog):
    model = ResNet(num_blocks=3, width=8, dropout=0.1)
    callbacks = [
        InitScheme(exclude=["head*"]),
        SignalPropagationMonitor(every_n_steps=2),
        DropoutSchedule(p=0.2, mode="early", cutoff_steps=3),
        StochasticDepthSchedule(drop_rate=0.3),
        FisherTraceMonitor(num_samples=20, batch_size=8, every_n_epochs=1),
        DeficitInjector("blur", start_epoch=0, end_epoch=1, size=2),
        GradientDynamicsMonitor(num_batches=3, every_n_steps=2),
    ]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(model, gaussian_loader(num=32, batch_size=8))
    lines = {who: [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{who} attached:")]
             for who in PREFIXES}
    assert all(len(found) == 1 for found in lines.values()), lines  # once per fit, not per epoch
    assert all(r.name.startswith("lightning.pytorch") for r in caplog.records if "attached:" in r.getMessage())
    texts = read_texts(tmp_path / "lightning_logs")
    for who, prefix in PREFIXES.items():
        assert texts[f"{prefix}/attached"] == lines[who]
    line = {who: found[0] for who, found in lines.items()}

    convs_and_linears = [n for n, m in model.named_modules() if type(m).__name__ in ("Conv2d", "Linear")]
    with_parameters = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert count(line["InitScheme"], "initialised") == len(convs_and_linears) - 1  # the head excluded
    assert count(line["InitScheme"], "skipped") == len(with_parameters) - len(convs_and_linears) + 1
    assert "head.2" in line["InitScheme"].split("skipped")[1]
    assert count(line["SignalPropagationMonitor"], "layers watched") == len(convs_and_linears)
    dropouts = [n for n, m in model.named_modules() if type(m).__name__ == "Dropout"]
    assert count(line["DropoutSchedule"], "dropout modules") == len(dropouts) == 3
    assert "cutoff at optimizer step 3" in line["DropoutSchedule"]
    assert count(line["StochasticDepthSchedule"], "residual branches") == 3
    assert "blocks.0.branch" in line["StochasticDepthSchedule"]
    assert "probe set: 20 training items" in line["FisherTraceMonitor"]
    assert "input_key=0" in line["FisherTraceMonitor"]
    assert count(line["FisherTraceMonitor"], "layers") == len(with_parameters)
    assert "blur(size=2)" in line["DeficitInjector"] and "[0, 1)" in line["DeficitInjector"]
    assert "(1, 8, 8) per item" in line["DeficitInjector"]
    assert count(line["GradientDynamicsMonitor"], "parameters tracked") == len(list(model.parameters()))
    assert "probe: 3 batches of 8" in line["GradientDynamicsMonitor"]


def test_init_scheme_says_it_initialised_nothing_on_trained_weights(tmp_path, caplog):
    model = ResNet(num_blocks=1, width=4)
    make_trainer(tmp_path, [InitScheme()], max_steps=1).fit(model, gaussian_loader(num=16))
    checkpoint = next((tmp_path / "lightning_logs").rglob("*.ckpt"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, [InitScheme()], max_steps=2).fit(model, gaussian_loader(num=16), ckpt_path=checkpoint)
    assert [r.getMessage() for r in caplog.records if "attached" in r.getMessage()] == [
        "InitScheme attached: initialised: none (the weights are trained)"
    ]
