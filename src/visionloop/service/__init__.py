"""What every HTTP service we ship (serve, monitor, loop) shares, below all of them.

- ``guard``: the pure-ASGI middleware in front of each app: bearer tokens checked before a body byte is read,
  the body cap (declared and streamed), the body read timeout, and every response counted (5xx and client
  disconnects included);
- ``protocol``: uvicorn's HTTP protocol with what uvicorn lacks: a request-head timeout, a head-size cap and a
  cap on open connections that sheds half-open ones first;
- ``hosts``: the Host allow-list and the refusal to bind a public address without tokens;
- ``server``: uvicorn started with all of the above from ``settings.http``;
- ``metrics``: the HTTP metrics of a side service.

Nothing here imports serving, monitoring or loop: they build on it.
"""
