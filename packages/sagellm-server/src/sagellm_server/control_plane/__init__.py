"""The control plane: engines (``sagellm-server --control-plane URL``) register with it and
heartbeat their load; it lists them (``GET /v1/engines``) and routes the OpenAI routes across the
healthy ones, with prefix affinity so that requests sharing a prompt prefix meet the same
engine's prefix cache.

One concept per module: :mod:`.protocol` (what engines send), :mod:`.registry` (who is up),
:mod:`.placement` (which engine gets a request), :mod:`.router` (forwarding, retries, SSE
passthrough), :mod:`.aggregate` (``/metrics`` and ``/v1/backends`` across engines),
:mod:`.heartbeat` (the engine's side), :mod:`.app` (the HTTP routes) and :mod:`.cli`
(``sagellm-control-plane``).
"""
