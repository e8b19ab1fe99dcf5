"""The Python examples of docs/own_model.md run as written (models built from configs, nothing downloaded)."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

pytest.importorskip("transformers")


def python_block(heading: str) -> str:
    """The first ```python block under the ``## heading`` of docs/own_model.md."""
    text = (REPO / "docs" / "own_model.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("heading", ["A Hugging Face example", "A causal-LM Fisher example"])
def test_own_model_examples_run(heading, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)  # the Trainer writes lightning_logs/ here
    namespace: dict = {}
    exec(compile(python_block(heading), heading, "exec"), namespace)
    logs = list(tmp_path.rglob("events.out.tfevents.*"))
    assert logs, "the example's Trainer wrote no TensorBoard events"
    if "trace" in namespace:
        assert namespace["trace"].total > 0 and namespace["trace"].num_samples == 16
