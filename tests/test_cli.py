"""The `startwell` command end to end: real training in a subprocess, TensorBoard events, config round trip, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QUICKSTART, read_images, read_scalars

from lightning_startwell.cli import main


def startwell(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the `startwell` console script that the install put beside this Python."""
    script = Path(sys.executable).parent / "startwell"
    assert script.exists(), f"the install did not create the `startwell` console script in {script.parent}"
    command = [str(script), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quickstart_short_run_writes_accuracy_and_loss_events(tmp_path):
    run = startwell(
        "fit", "--config", str(QUICKSTART), "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    scalars = read_scalars(tmp_path / "lightning_logs")
    for tag in (
        "train/acc", "train/loss", "train/loss_step", "val/acc", "val/loss",
        "startwell/init/std/stem.0", "startwell/init/target_std/stem.0", "startwell/init/forward_ratio/head.2",
        "startwell/signal/forward_ratio", "startwell/signal/backward_ratio", "startwell/signal/backward/stem.0",
        "startwell/dropout/rate", "startwell/depth/drop_rate", "startwell/depth/expected_depth",
        "startwell/deficit/active", "startwell/fisher/trace", "startwell/fisher/layer/stem.0",
        "startwell/dynamics/grad_norm", "startwell/dynamics/distance", "startwell/dynamics/direction_variance",
        "startwell/dynamics/direction_error",
    ):
        assert tag in scalars, sorted(scalars)
    assert len(scalars["val/acc"]) == 2
    assert all(0.0 <= value <= 1.0 for _, value in scalars["val/acc"])
    images = read_images(tmp_path / "lightning_logs")  # TensorBoard's Images tab
    for tag in ("startwell/init/profile", "startwell/signal/profile", "startwell/fisher/heatmap"):
        assert tag in images, sorted(images)
    (start, _), (end, _) = images["startwell/schedule/overview"]  # the plan at the start, again at the end
    assert start == 0 and end == 2 * 20  # 2 epochs of 20 batches (1,257 training digits, batch 64)


@pytest.mark.slow
def test_quickstart_learns_and_checkpoint_tests(tmp_path):
    fit = startwell("fit", "--config", str(QUICKSTART), "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    scalars = read_scalars(tmp_path / "lightning_logs" / "version_0")
    final_val_acc = scalars["val/acc"][-1][1]
    assert final_val_acc > 0.9  # chance is 0.1
    assert scalars["val/acc"][-1][1] > scalars["val/acc"][0][1] or scalars["val/acc"][0][1] > 0.9
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    test = startwell(
        "test", "--config", str(QUICKSTART), "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    test_acc = read_scalars(tmp_path / "lightning_logs" / "version_1")["test/acc"][-1][1]
    assert test_acc > 0.9


def _print_config(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_config_round_trips(tmp_path, capsys):
    first = _print_config(QUICKSTART, capsys)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(first)
    second = _print_config(dumped, capsys)
    assert yaml.safe_load(first) == yaml.safe_load(second)
    original, parsed = yaml.safe_load(QUICKSTART.read_text()), yaml.safe_load(second)
    assert parsed["model"]["class_path"] == original["model"]["class_path"]
    for key, value in original["model"]["init_args"].items():
        if isinstance(value, dict):
            assert parsed["model"]["init_args"][key]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= parsed["model"]["init_args"][key]["init_args"].items()
        else:
            assert parsed["model"]["init_args"][key] == value
    assert original["data"]["init_args"].items() <= parsed["data"]["init_args"].items()
    callbacks = original["trainer"].pop("callbacks")
    assert original["trainer"].items() <= parsed["trainer"].items()
    assert [c["class_path"] for c in callbacks] == [c["class_path"] for c in parsed["trainer"]["callbacks"]]
    for given, dumped in zip(callbacks, parsed["trainer"]["callbacks"], strict=True):
        assert given["init_args"].items() <= dumped["init_args"].items()


def test_cli_instantiates_what_the_config_says(tmp_path):
    from lightning_startwell.cli import StartwellCLI

    cli = StartwellCLI(
        args=["--config", str(QUICKSTART), "--trainer.default_root_dir", str(tmp_path)],
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
    )
    assert type(cli.model).__name__ == "ResNet" and len(cli.model.blocks) == 3
    assert cli.model.input_shape == (1, 8, 8) and cli.model.num_classes == 10  # linked from the datamodule
    optimizer = cli.model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 0.0005


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model", "Perceptron"], ["Perceptron", "MLP, ConvNet, ResNet"]),
        (["--data", "CIFAR10"], ["CIFAR10", "DigitsDataModule, MNIST1DDataModule"]),
        (["--model", "MLP", "--model.activation", "sigmoid"], ["sigmoid", "relu", "leaky_relu", "tanh"]),
        (["--model.init_args.no_such_key", "3"], ["no_such_key"]),
        (["--trainer.callbacks+=InitScheme", "--trainer.callbacks.scheme=xavier"], ["xavier", "glorot_normal"]),
    ],
)
def test_bad_names_and_keys_fail_before_training_naming_what_is_accepted(tmp_path, capsys, override, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--trainer.default_root_dir", str(tmp_path), *override])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not (tmp_path / "lightning_logs").exists()


def test_empty_split_fails_before_training_naming_the_fraction(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        main(["fit", "--config", str(QUICKSTART), "--trainer.default_root_dir", str(tmp_path),
              "--data.init_args.val_fraction", "0.0001"])
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize(
    "name", ["quickstart", "early_dropout", "early_stochastic_depth", "late_stochastic_depth", "critical_period"]
)
def test_example_configs_train_for_a_few_steps(tmp_path, name):
    config = QUICKSTART.parent / f"{name}.yaml"
    main(["fit", "--config", str(config), "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar=false"])
    scalars = read_scalars(tmp_path / "lightning_logs")
    expected = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    prefixes = {"DropoutSchedule": "startwell/dropout/", "StochasticDepthSchedule": "startwell/depth/",
                "InitScheme": "startwell/init/", "SignalPropagationMonitor": "startwell/signal/",
                "DeficitInjector": "startwell/deficit/", "FisherTraceMonitor": "startwell/fisher/",
                "GradientDynamicsMonitor": "startwell/dynamics/"}
    for callback in expected:
        prefix = prefixes[callback["class_path"].rpartition(".")[2]]
        assert any(tag.startswith(prefix) for tag in scalars), (prefix, sorted(scalars))


def test_readme_callback_snippets_build_their_callbacks():
    import importlib
    import re

    readme = (QUICKSTART.parents[2] / "README.md").read_text()
    snippets = re.findall(r"`(- \{class_path: .*?\})`", readme)
    assert len(snippets) == 9
    for snippet in snippets:
        (entry,) = yaml.safe_load(snippet)
        module, _, name = entry["class_path"].rpartition(".")
        callback = getattr(importlib.import_module(module), name)(**entry["init_args"])
        assert type(callback).__name__ == name
