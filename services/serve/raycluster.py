"""Ray, for what scales out over machines (``serve --ray``, ``train-many --ray``): the one
place that imports it, and connects this process to a cluster.

Ray is the optional ``[ray]`` extra: importing this module without it raises ``RayMissing``
(a ReftError the CLI prints in one line, and an ImportError ``pytest.importorskip`` skips).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from edge_reft.errors import ReftError


class RayMissing(ReftError, ModuleNotFoundError):
    """ray is not installed."""


# Ray on Linux turns a node address of 127.0.0.1 into the host's reachable one, and its processes
# listen on every interface.  This switch, read once when ray is imported (here and by the
# cluster's processes, which inherit it), keeps a cluster started here on the loopback;
# ``connected`` checks that it did.
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault(LOOPBACK, "0")
try:
    import ray
except ImportError as e:  # the [ray] extra is optional: say how to get it, in one line
    raise RayMissing(f"Ray is not installed ({e.name or e}): pip install 'edge-reft[ray]' "
                     "(ray[serve]==2.60.0)") from None


@contextlib.contextmanager
def connected(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> Iterator[bool]:
    """Connect to the cluster at ``address`` (host:port, or ``auto``; None: ``RAY_ADDRESS`` if
    set), or start one of this machine alone when there is none or ``address`` is ``local``:
    its processes on 127.0.0.1, no dashboard.  Yields whether the cluster is our own.  On the
    way out a cluster of our own is shut down; from a joined one this process disconnects."""
    address = os.environ.get("RAY_ADDRESS") if address is None else address
    own = address in (None, "", "local")
    local = dict(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus or os.cpu_count(),
                 object_store_memory=256 << 20)
    ray.init(address=None if own else address, log_to_driver=not quiet, logging_level="WARNING",
             **(local if own else {}))
    try:
        if own and ray.util.get_node_ip_address() != "127.0.0.1":
            raise ReftError(f"the local Ray cluster listens on {ray.util.get_node_ip_address()}, not 127.0.0.1: "
                            f"ray was imported before edge_reft.services.serve.raycluster (or set {LOOPBACK}=0)")
        yield own
    finally:
        ray.shutdown()
