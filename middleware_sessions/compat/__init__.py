"""Drop-in replacements for the peers: change one import, keep the code, gain our promise.

- ``middleware_sessions.compat.fastapi_sqlalchemy`` for fastapi-sqlalchemy 0.2.1;
- ``middleware_sessions.compat.fastapi_async_sqlalchemy`` for fastapi-async-sqlalchemy.

Both are thin layers over ``Database``/``AsyncDatabase`` and ``DBSessionMiddleware``;
where they behave differently from the peer, ``docs/migrating.md`` says how and why.
"""
