"""Framework integrations: ``asyncgone.integrations.starlette``, ``.fastapi`` and ``.quart``.

Each needs its framework installed (``pip install 'asyncgone[starlette]'``, ``[fastapi]``,
``[quart]``) and builds on ``asyncgone.Database``.
"""
