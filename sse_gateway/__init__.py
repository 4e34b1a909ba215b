"""sse-gateway: durable per-session event logs, streamed as Server-Sent Events with exact resume."""

__version__ = "0.1.0"


def create_app(*args, **kwargs):
    """Build the ASGI app (see ``sse_gateway.app.create_app``)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["__version__", "create_app"]
