"""Trace of the Fisher information, total and per layer, from exact per-sample gradient norms (pure PyTorch).

For a classifier p_w(y|x) (softmax of the logits; a Gaussian N(output, s^2 I) for regression), Achille et al. (2017)
follow

    tr F = E_x E_{y ~ p_w(.|x)} || grad_w log p_w(y|x) ||^2,

per layer the same sum restricted to that layer's parameters. Three Fishers:

* ``true``: y drawn once per input from the model's own predictive distribution (seeded);
* ``empirical``: y = the dataset label (a different quantity: it measures the fit to the labels);
* ``exact``: the expectation over y in closed form, sum_c p_c ||grad log p_c||^2 (C backward passes; for the Gaussian,
  sum_k ||grad output_k||^2 / s^2, one pass per output dimension).

A model with (N, T, C) outputs (a language model) has one likelihood per position; a sample's log-likelihood is the
sum over its positions, a ``mask`` and (``empirical``) targets of -100 leave positions out, and ``exact`` costs
T x C backward passes (see ``likelihoods.py``): ``true`` is the choice for large vocabularies.

The norms are *per sample* (squaring the gradient of a batch mean would be about N times too small). The default method
never materialises per-sample gradients where a closed form exists. Forward hooks keep each layer's input and register a
tensor hook on its output, which receives delta_i = d(sum_i log p(y_i|x_i))/d layer output (tensor hooks on outputs,
unlike module full-backward hooks, survive torchvision's in-place ReLU and ``out += identity``); then, per sample i:

* Linear on (N, d) inputs: ||g_i||^2 = ||a_i||^2 ||delta_i||^2 (+ ||delta_i||^2 for the bias);
* Linear on sequences and Conv1d/Conv2d (inputs unfolded to A_i, T x d; output gradients D_i, T x p):
  ||D_i^T A_i||_F^2, either materialised (T p d operations) or as <A_i A_i^T, D_i D_i^T>_F ("ghost norm", T^2 (d + p)
  operations), whichever is cheaper; bias ||sum_t D_i[t]||^2;
* BatchNorm (eval mode, running statistics) and LayerNorm: gamma_i = sum delta_i * x_hat_i, beta_i = sum delta_i;
* Embedding: the ghost norm with one-hot inputs, sum_{t,t'} [token_t = token_t'] <delta_i[t], delta_i[t']>;
* MultiheadAttention: the module re-run on its projected Q, K, V with identity projections gives the context and
  dL/dQ, dL/dK, dL/dV; both projections are then Linear layers on sequences;
* any other module with its own parameters, or with some of them frozen: per-sample vector-Jacobian products with
  ``torch.func.vmap`` over that module alone, from its recorded inputs (split by sample where they hold the samples,
  keyword arguments such as padding masks included; passed whole where they are shared) and output gradients.

Nothing is guessed from shapes: which tensors hold the samples is decided by comparing runs of one and two samples
(``provenance.py``), and a layer's norms come from its hooks only when its rule's tensors hold the samples, it ran
once, owns its parameters alone (per-use norms of a tied or reused parameter are wrong: the per-sample gradient is the
sum over uses), returns a hookable output that alone received gradient, and is not the model itself. Every other
parameter (a position embedding of ``arange(T)``, a ``cls_token``, a dict-returning head, a tied weight) goes to the
exact path: ``torch.func`` per-sample gradients of the whole model restricted to those parameters, with the same label
draws; when the whole model's per-sample gradients are small, the whole model takes that path (``method="vmap"``).

The measurement runs in eval mode (BatchNorm with running statistics: per-sample gradients are undefined when samples
are normalised together) with autocast off, never writes ``.grad``, and restores the mode of every module. The model
runs in its own dtype (float inputs are cast to it: a model in bfloat16 gets bfloat16 inputs); the per-sample norms are
computed in float32 at least (half-precision activations and gradients are upcast per layer) and summed in float64
(float32 on a device without float64, see :mod:`lightning_startwell._precision`).
"""

from __future__ import annotations

from lightning_startwell.fisher.checks import (
    FISHERS,
    LIKELIHOODS,
    METHODS,
    FisherKind,
    Likelihood,
    Method,
    check_fisher_arguments,
)
from lightning_startwell.fisher.likelihoods import check_output
from lightning_startwell.fisher.ownership import owned_parameters
from lightning_startwell.fisher.trace import FisherTrace, fisher_trace, fisher_trace_sums, layer_order

__all__ = [
    "FISHERS",
    "FisherKind",
    "LIKELIHOODS",
    "METHODS",
    "Likelihood",
    "Method",
    "FisherTrace",
    "check_fisher_arguments",
    "check_output",
    "fisher_trace",
    "fisher_trace_sums",
    "layer_order",
    "owned_parameters",
]
