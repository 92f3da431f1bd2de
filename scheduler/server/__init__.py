"""Network front ends over the control plane's ``IngressAPI``.

- ``grpc_server``: ``llmsched.v1`` Inference + Admin, health, reflection (``build_server``, ``serve``).
- ``http_server``: OpenAI-compatible HTTP (``build_app``; imports FastAPI, so import it explicitly).
- ``auth``: bearer tokens (client vs admin) and TLS/mTLS, shared by both.
- ``echo``: ``EchoIngress``, a deterministic in-process ingress for tests, benches and smoke runs.
- ``background``: ``BackgroundServer``, a server on its own loop thread (tests, embedding beside blocking code).

See docs/api.md.
"""
