"""Against the real api.runflow.io: opt-in only (pytest --live, with RUNFLOW_API_KEY set).

These never run in CI. They check only what costs nothing: health and authentication.
"""

from __future__ import annotations

import anyio
import pytest

from runflow_frames import AsyncRunflowClient, RequestRejectedError

from .conftest import LIVE_API_KEY

pytestmark = pytest.mark.live


def test_real_api_health_and_key() -> None:
    key = LIVE_API_KEY or pytest.fail("--live needs RUNFLOW_API_KEY")

    async def main() -> None:
        async with AsyncRunflowClient(api_key=key) as client:
            assert await client.health()
            with pytest.raises(RequestRejectedError) as info:
                await client.get_batch("00000000-0000-7000-8000-000000000000")
            assert info.value.status_code == 404

    anyio.run(main)
