"""Tools for testing applications against connections that die: a fault-injecting TCP proxy
and a disposable MariaDB server.

    from asyncgone.testing import FaultProxy, MariaDBServer
"""

from ._mariadb import MariaDBServer, ServerBinaryNotFound
from ._proxy import FaultProxy

__all__ = ["FaultProxy", "MariaDBServer", "ServerBinaryNotFound"]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
