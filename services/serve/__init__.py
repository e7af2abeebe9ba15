"""The OpenAI-compatible HTTP server: a patch per request, a pool of engines.

Imports: edge_reft, edge_reft.runtime

``server.py`` (routes, errors), ``api.py`` (request bodies), ``pool.py`` (engines, the
queue, abandoned requests), ``patchstore.py`` (patches by name, bound to the model once),
``access.py`` (bearer keys).
"""
