"""Serving: an OpenAI-compatible API over many adapters and tenants (``loraforge serve``)."""
