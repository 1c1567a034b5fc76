"""Named crash points for crash-safety tests: `PLEXUS_FAILPOINTS=sriov_vf_moved` makes plexusd
SIGKILL itself the moment it reaches that point, the way a node loses power or the OOM killer
strikes, so a test can prove that a restart neither loses nor double-allocates a VF.

Unset (production), `hit()` is one dict lookup. The environment is read once, at import.
"""

from __future__ import annotations

import os
import signal
from typing import Final

_ARMED: Final = frozenset(
    name.strip() for name in os.environ.get("PLEXUS_FAILPOINTS", "").split(",") if name.strip()
)


def hit(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
