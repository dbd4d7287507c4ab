"""Look inside Mamba models: hidden-attention matrices, attributions and pictures.

* :mod:`~mambakit.interpret.hidden_attention` -- the data-controlled L x L matrices of one Mamba / Mamba2 layer
  (the scan's own, and the full-block form with conv, SiLU and gates folded in);
* :mod:`~mambakit.interpret.softmax_attention` -- the softmax matrices of an attention (MHA) layer of a hybrid;
* :mod:`~mambakit.interpret.attribution` -- per-layer means, rollout, gradient-weighted rollout, token relevance
  over a whole `MambaLMHeadModel` or `HybridLM`;
* :mod:`~mambakit.interpret.plots` -- heatmaps and relevance bars (matplotlib, imported when drawing).
The ``explain`` subcommand itself is :mod:`mambakit.cli.explain`.
"""
from mambakit.interpret.attribution import (
    FORMS,
    Explanation,
    attention_rollout,
    explain,
    gradient_weighted_attentions,
    layer_attentions,
    mixer_layer_indices,
    mixer_layers,
    token_relevance,
)
from mambakit.interpret.hidden_attention import (
    BlockAttention,
    block_attention,
    conv_toeplitz,
    hidden_attention,
    mamba1_block_attention,
    mamba1_hidden_attention,
    mamba2_block_attention,
    mamba2_hidden_attention,
    selective_scan_attention,
)
from mambakit.interpret.softmax_attention import attention_values, softmax_attention
from mambakit.interpret.plots import byte_token_labels, plot_attention, plot_explanation, plot_relevance

__all__ = [
    "BlockAttention", "Explanation", "FORMS", "attention_rollout", "block_attention", "byte_token_labels",
    "conv_toeplitz", "explain", "gradient_weighted_attentions", "hidden_attention", "layer_attentions",
    "mamba1_block_attention", "mamba1_hidden_attention", "mamba2_block_attention", "mamba2_hidden_attention",
    "mixer_layer_indices", "mixer_layers", "plot_attention", "plot_explanation", "plot_relevance",
    "selective_scan_attention",
    "softmax_attention", "attention_values", "token_relevance",
]
