"""Serving many adapters on one base: the batched multi-adapter engine (and, later, the HTTP server)."""
