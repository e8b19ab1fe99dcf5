"""The library's hooks and measurements on a ``torch.compile``d model (pure PyTorch, no Lightning).

Two facts of Dynamo decide what the callbacks do:

* Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``, True by default): code
  compiled before a forward hook was registered never calls it, and code compiled with a hook keeps calling it after the
  hook is removed. Hooks that stay for a whole fit (stochastic depth) drop the compiled code when they are attached and
  when they are removed (:func:`forget_compiled_code`); hooks that live for one step (the signal monitor's) run that
  step eagerly (:func:`eager`).
* A measurement that calls the model in another mode (eval, ``torch.func`` transforms, other shapes) recompiles it, each
  time a new guard fails, until Dynamo's recompile limit sends it back to eager. Measurements (Fisher trace, LSUV and
  forward ratios, gradient directions) therefore run eagerly: they compile nothing, and the training step's compiled
  code is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eager() -> Iterator[None]:
    """Inside, compiled functions and modules run their Python code eagerly and compile nothing
    (``torch.compiler.set_stance("force_eager")``); outside, their compiled code runs again. A no-op inside a compiled
    region (where the stance cannot change) and on torch < 2.6 (no stances)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        yield
        return
    with set_stance("force_eager"):
        yield


def is_compiled(module: nn.Module) -> bool:
    """Whether calling ``module`` may run compiled code: a LightningModule given to ``Trainer.fit`` as
    ``torch.compile(module)`` (Lightning marks it ``_compiler_ctx``), a ``torch.compile``d submodule inside it, or a
    module compiled in place with ``Module.compile()``."""
    if getattr(module, "_compiler_ctx", None):
        return True
    from torch._dynamo.eval_frame import OptimizedModule

    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()
    )


def forget_compiled_code(module: nn.Module) -> None:
    """Drop the compiled code of a compiled ``module`` so that its next call is traced again, with the module hooks it
    has now. Dynamo has no per-module reset: ``torch.compiler.reset()`` drops every compiled function of the process,
    which each recompile once at their next call. Nothing happens for a module that is not compiled."""
    if is_compiled(module):
        torch.compiler.reset()


__all__ = ["eager", "forget_compiled_code", "is_compiled"]
