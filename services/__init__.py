"""Layer 4, the services: what users call.  The ``edge-reft`` command (``cli/``), the
OpenAI-compatible server (``serve/``) and ``evaluate`` (a patch's scores on a data set).

Imports: edge_reft, edge_reft.runtime, edge_reft.train, edge_reft.converters, edge_reft.services.serve

They choose the default model (edge_reft.models) and the backend (runtime.backends);
engines never do.
"""
