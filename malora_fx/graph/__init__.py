"""Stage 1 — model in, graph out: load a model (``sources``), capture it as a
``torch.fx.GraphModule`` (``capture``, ``cached_decoder`` for decoders with a
KV cache) and find its linear call sites (``sites``)."""
