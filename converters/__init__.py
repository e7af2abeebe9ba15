"""Layer 3, the converters: pyreft checkpoints to ``.reft`` and back (``pyreft``, reading
torch's pickle without torch: ``torch_pickle``), and a base model to an ONNX graph with
patch inputs (``onnx_export``, which checks its export through the ONNX engine).

Imports: edge_reft, edge_reft.runtime, edge_reft.runtime.onnx, edge_reft.train
"""
