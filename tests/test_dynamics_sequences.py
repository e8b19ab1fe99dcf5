"""GradientDynamicsMonitor's probe gradients on per-position outputs (a causal language model's tokens, a
segmentation model's pixels): the mean loss over the positions kept, against a float64 loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_startwell.dynamics import gradient_directions, mean_loss, probe_gradient


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def lm_batch(seed: int):
    """Token ids (N, T) with right padding, the attention mask, and the next-token targets: -100 on padding and on
    each sample's last real token (nothing follows it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 10), generator=g)
    lengths = torch.tensor([10, 7, 4])
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[(torch.arange(10)[None] >= (lengths - 1)[:, None])] = -100
    return ids, mask, targets


def float64_gradient(model, ids, mask, targets):
    """The gradient of the mean next-token negative log-likelihood over the kept positions, in float64, by a loop
    over samples and positions."""
    model = model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=ids, attention_mask=mask).logits
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if targets[i, t] != -100:
                total = total - torch.log_softmax(logits[i, t], dim=-1)[targets[i, t]]
                count += 1
    grads = torch.autograd.grad(total / count, params, allow_unused=True)
    model.float()
    flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(flat)


def test_causal_lm_probe_gradient_is_the_mean_per_token_loss_against_float64():
    model = tiny_gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, targets = lm_batch(0)
    got = probe_gradient(model, {"input_ids": ids, "attention_mask": mask}, targets, params).double()
    expected = float64_gradient(model, ids, mask, targets)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_mask_leaves_positions_out_as_minus_100_does():
    model = tiny_gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, targets = lm_batch(1)
    unmasked_targets = targets.clone()
    unmasked_targets[:, :-1] = ids[:, 1:]  # padding positions get real targets back: only the mask leaves them out
    position_mask = (targets != -100).long()
    got = probe_gradient(
        model, {"input_ids": ids, "attention_mask": mask}, unmasked_targets, params, mask=position_mask
    ).double()
    assert torch.allclose(got, float64_gradient(model, ids, mask, targets), rtol=1e-4, atol=1e-9)


def test_directions_of_per_token_gradients_against_float64_cosines():
    model = tiny_gpt2()
    grads64, grads = [], []
    params = [p for p in model.parameters() if p.requires_grad]
    for seed in range(3):
        ids, mask, targets = lm_batch(seed)
        grads.append(probe_gradient(model, {"input_ids": ids, "attention_mask": mask}, targets, params))
        grads64.append(float64_gradient(model, ids, mask, targets))
    cos = [F.cosine_similarity(grads64[i], grads64[j], dim=0).item() for i in range(3) for j in range(i + 1, 3)]
    whole = sum(grads64) / 3
    to_whole = [F.cosine_similarity(g, whole, dim=0).item() for g in grads64]
    stats = gradient_directions(grads)
    assert stats.variance == pytest.approx(sum((1 - c) / 2 for c in cos) / 3, abs=1e-5)
    assert stats.error == pytest.approx(sum((1 - c) / 2 for c in to_whole) / 3, abs=1e-5)


def test_per_pixel_cross_entropy_is_the_mean_over_kept_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    targets = torch.randint(0, 4, (2, 3, 5))
    targets[0, 1, 2] = -100
    mask = torch.ones(2, 3, 5)
    mask[1, 0] = 0
    values = [
        -torch.log_softmax(logits[n, :, h, w], dim=0)[targets[n, h, w]].item()
        for n in range(2) for h in range(3) for w in range(5)
        if targets[n, h, w] != -100 and mask[n, h, w] == 1
    ]
    assert mean_loss("cross_entropy", logits, targets, mask).item() == pytest.approx(math.fsum(values) / len(values))


def test_targets_that_do_not_match_the_output_name_target_key():
    with pytest.raises(ValueError, match="target_key"):
        mean_loss("cross_entropy", torch.randn(4, 16, 100), torch.zeros(4, 100, dtype=torch.long))
    with pytest.raises(ValueError, match="mse"):
        mean_loss("mse", torch.randn(4, 3), torch.zeros(4, 2))


def test_masked_mse_is_the_mean_over_kept_positions():
    output, targets = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = [((output[n, t] - targets[n, t]) ** 2).tolist() for n in range(2) for t in range(3) if mask[n, t]]
    expected = math.fsum(v for row in kept for v in row) / (len(kept) * 4)
    assert mean_loss("mse", output, targets, mask).item() == pytest.approx(expected)
