"""A faithful local Runflow batch API, over real HTTP or in-process.

Three ways to run it:

- ``runflow-frames emulator --port 8080`` in a shell;
- ``with serve(Emulator()) as base_url:`` in Python, on a free loopback port;
- ``httpx.ASGITransport(create_app(emulator))`` in-process, for fast tests.

Needs the ``emulator`` extra: ``pip install 'runflow-frames[emulator]'``.
"""

from ._faults import Faults
from ._models import ModelSpec, builtin_models
from ._state import Accounting, Emulator, Timing

__all__ = [
    "Accounting",
    "Emulator",
    "Faults",
    "ModelSpec",
    "Timing",
    "builtin_models",
    "create_app",
    "serve",
]


def __getattr__(name: str) -> object:
    # The HTTP layers import starlette and uvicorn only when asked for, so that the pure state
    # machine imports without the extra.
    if name == "create_app":
        from ._app import create_app

        return create_app
    if name == "serve":
        from ._serve import serve

        return serve
    raise AttributeError(name)
