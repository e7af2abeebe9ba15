"""The OpenAI-compatible HTTP server: a patch per request, many requests in one batch.

Imports: edge_reft, edge_reft.runtime

``server.py`` (routes, errors), ``api.py`` (request bodies), ``pool.py`` (workers, each
stepping a batch of slots; the queue, abandoned requests), ``patchstore.py`` (patches by
name, bound to the model once), ``registry.py`` (patches pulled from a manifest of URLs and
sha256s), ``access.py`` (bearer keys), ``ray_serve.py`` (the same app as Ray Serve
deployments routed by patch), ``raycluster.py`` (the only module that imports ray: the
cluster connection, for ``ray_serve`` and for ``edge_reft.services.fleet_ray``).
"""
