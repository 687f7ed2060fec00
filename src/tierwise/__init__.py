"""tierwise: cost-effective ML inference across device, edge and cloud.

`tierwise.Client` is the device SDK; it needs numpy, onnxruntime, httpx, zstandard and
Pillow only. Plans and SLOs: `tierwise.planner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tierwise.client import Client


def __getattr__(name: str) -> Any:
    # Imported on first use so `import tierwise` stays cheap for servers and the CLI.
    if name == "Client":
        from tierwise.client import Client

        return Client
    raise AttributeError(f"module 'tierwise' has no attribute {name!r}")


__all__ = ["Client", "__version__"]
