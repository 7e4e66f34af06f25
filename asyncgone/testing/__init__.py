"""Tools for testing applications against connections that die: a fault-injecting TCP proxy,
a disposable MariaDB server (with TLS if asked), and disposable multi-server topologies (a
primary with GTID replicas, a Galera cluster) to fail over and take nodes out.

    from asyncgone.testing import FaultProxy, GaleraCluster, MariaDBServer, ReplicationTopology
    from asyncgone.testing import TLSCertificates
"""

from ._galera import GaleraCluster
from ._mariadb import AdminQueryError, MariaDBServer, ServerBinaryNotFound
from ._proxy import FaultProxy
from ._replication import ReplicationTopology
from ._tls import TLSCertificates
from ._topology import TopologyError

__all__ = [
    "AdminQueryError",
    "FaultProxy",
    "GaleraCluster",
    "MariaDBServer",
    "ReplicationTopology",
    "ServerBinaryNotFound",
    "TLSCertificates",
    "TopologyError",
]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
