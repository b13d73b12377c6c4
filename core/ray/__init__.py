"""loraplex on Ray Serve: many engine replicas behind one OpenAI endpoint, requests routed to the
replicas that already hold their adapter (Ray Serve's model multiplexing).

    serve run loraplex.ray:app model=DIR enable_lora=true num_replicas=2
    loraplex serve DIR --enable-lora --ray --num-replicas 2

Needs the `ray` extra (`pip install 'loraplex[ray]'`); see docs/scale-out.md. Ray is imported
only when one of the names below is used, so `loraplex serve --help` (which lists the flags of
loraplex.ray.options) works without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "build_application", "run_on_local_ray"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'loraplex.ray' has no attribute {name!r}")
    try:
        from . import application as app_module
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "ray":
            raise ImportError(f"loraplex.ray needs Ray Serve ({exc}); install it with: pip install 'loraplex[ray]'") from exc
        raise
    return getattr(app_module, name)
