"""The llama.cpp backend (through llama-cpp-python): patches applied inside llama.cpp's eval
callback.

Imports: edge_reft, edge_reft.runtime

``engine.py``: ``LlamaCppEngine``, the four primitives over one model and its contexts.
``native.py``: the thin ctypes owner of llama.cpp and ggml (model, contexts, vocabulary).
``gate.py`` + ``gate.c``: the eval callback that applies the edits, in C (built at install)
or in Python (the fallback; same results).
``repack.py``: whether llama.cpp may repack CPU weights (off where it offers AMX).
"""
