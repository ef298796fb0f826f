"""API keys: the keys file format, the keys CLI (`python -m service.auth.keys`)
and the ASGI middleware that checks them.

This package's __init__ and keyfile/keys modules use the standard library only,
so the CLI runs without the virtualenv; only `middleware` needs Starlette.
"""
