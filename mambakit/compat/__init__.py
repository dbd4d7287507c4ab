"""Drop-in replacements for code written against the official `mamba_ssm` and `causal_conv1d` packages.

Change only the imports (``mamba_ssm`` -> ``mambakit.compat.mamba_ssm``, ``causal_conv1d`` ->
``mambakit.compat.causal_conv1d``): the module paths, function signatures, argument forms and return values mirror
the official ones, built as thin adapters on mambakit's public ops, layers and models. An application-level
package: it imports ops, layers and models; nothing in mambakit imports it. docs/compat.md lists every official
name, what it maps to, what differs and what is not supported yet.
"""
