"""Everything the pack knows about transformers' internals, in one package.

It is the only importer of non-public transformers modules (``cache_utils``, ``masking_utils``,
``modeling_utils``, ``models.*``, ``integrations``); the stages, batching and the adapters see its
functions and the adapter, never transformers' private names. Each version-dependent branch names
the releases it serves (``versions.py`` lists the tested range).

- ``cache.py``: every cache form, built on transformers' ``Cache`` and per-layer classes;
- ``layers.py``: the decoder-layer loop (transformers' own layers, one by one);
- ``attention_hook.py``: AdaTP's attention function, registered through ``AttentionInterface``;
- ``kernels.py``: which code runs the Gated DeltaNet layers (hub kernel, local package, PyTorch);
- ``vision.py``: the Qwen vision towers with their attention batched;
- ``sdpa_copy.py``: what a masked decode step's sdpa attention copies, per release (memory estimates).
"""
