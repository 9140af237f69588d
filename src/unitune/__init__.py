"""unitune: SFT and preference optimization, jointly, in one run.

    import unitune
    summary = unitune.train("config.yaml")   # or a dict, or a unitune.Config

`unitune.train`, `evaluate`, `merge` and `sweep` are the commands as functions (`unitune.api`).
`import unitune` is cheap (no torch): they and the config and error types are imported when first
used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "api": "unitune.api",
    "train": "unitune.api",
    "evaluate": "unitune.api",
    "merge": "unitune.api",
    "sweep": "unitune.api",
    "Config": "unitune.config",
    "MergeConfig": "unitune.config",
    "ConfigError": "unitune.config",
    "DataError": "unitune.data.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'unitune' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "api" else getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
