"""DropoutSchedule on a LightningModule holding a ``torch.compile``d submodule (``self.net = torch.compile(net)``), in
a real fit, with a counting backend: the rates are rounded to a few levels and the compilations stay bounded."""

from __future__ import annotations

import pytest
import torch
from conftest import gaussian_loader, make_trainer

from lightning_startwell import MLP, DropoutSchedule
from lightning_startwell.callbacks.dropout_schedule import COMPILED_RATE_LEVELS


def test_a_compiled_submodule_gets_the_compile_safe_rates(tmp_path):
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = MLP(depth=2, width=16, dropout=0.1)
    dropouts = [m for m in model.net.modules() if isinstance(m, torch.nn.Dropout)]
    model.net = torch.compile(model.net, backend=counting)  # the submodule only: Lightning sees an eager module
    assert not getattr(model, "_compiler_ctx", None)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(dropouts[0].p) if module.training else None)
    schedule = DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_steps=24)  # exact rates asked
    try:
        with pytest.warns(UserWarning, match="rounded to 5 levels"):
            make_trainer(tmp_path, [schedule], max_steps=30).fit(model, gaussian_loader(num=30 * 4, batch_size=4))
    finally:
        torch._dynamo.reset()
    # linspace(0.1, 0, 24) rounded to 5 levels of 0.025: each step's rate is the level nearest the exact one.
    exact = [0.1 * (1 - s / 23) if s < 24 else 0.0 for s in range(30)]
    assert seen == pytest.approx([round(r / 0.025) * 0.025 for r in exact], abs=1e-12)
    assert len(set(seen)) == COMPILED_RATE_LEVELS
    assert 1 <= len(graphs) <= COMPILED_RATE_LEVELS  # 24 distinct rates exactly: Dynamo's limit of 8 without rounding
