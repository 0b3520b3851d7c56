"""Integrations of gemma4_passes with serving engines.

- :mod:`gemma4_passes.integrations.sglang_plugin`: an SGLang general plugin
  (entry-point group ``sglang.srt.plugins``) that installs the package's
  Inductor pass when SGLang configures ``torch.compile``.
"""
