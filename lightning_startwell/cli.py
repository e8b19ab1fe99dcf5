"""The ``startwell`` command: LightningCLI over the demo models and the embedded datamodules.

``startwell fit --config examples/configs/quickstart.yaml`` trains; ``validate`` and ``test`` evaluate. Models and
datamodules are named by class (``model.class_path: ResNet``); ``input_shape`` and ``num_classes`` of the model come
from the datamodule.
"""

from __future__ import annotations

from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_startwell.data import ArrayDataModule, DigitsDataModule, MNIST1DDataModule
from lightning_startwell.models import MLP, Classifier, ConvNet, ResNet

MODELS = (MLP, ConvNet, ResNet)
DATAMODULES = (DigitsDataModule, MNIST1DDataModule)


def _names(classes: tuple[type, ...]) -> str:
    return ", ".join(cls.__name__ for cls in classes)


class StartwellArgumentParser(LightningArgumentParser):
    """Parser whose errors about an unknown class name list the models and datamodules that are accepted."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if "import path" in message:
            message += (
                f"\nAccepted `model` names: {_names(MODELS)} (or the import path of a {Classifier.__name__} subclass);"
                f" accepted `data` names: {_names(DATAMODULES)} (or the import path of an"
                f" {ArrayDataModule.__name__} subclass)."
            )
        super().error(message, ex)


class StartwellCLI(LightningCLI):
    """LightningCLI with the model's data-dependent sizes linked to the datamodule."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``startwell`` console script (``args`` replaces ``sys.argv[1:]`` when given)."""
    StartwellCLI(
        Classifier,
        ArrayDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_class=StartwellArgumentParser,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
