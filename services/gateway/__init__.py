"""The gateway service: the OpenAI-compatible HTTP API, translated to the NATS public API."""
