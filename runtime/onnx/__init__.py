"""The ONNX Runtime backend: patches are graph inputs of an ``edge-reft export-onnx`` folder.

Imports: edge_reft, edge_reft.runtime

``engine.py``: ``OnnxEngine``, the four primitives and ``generate_batch``.
``native.py``: the folder's manifest, patches laid out as the graph's inputs, and the
IOBinding and KV buffers onnxruntime runs with.
"""
