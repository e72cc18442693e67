"""Utilities beside the core API, named as Ray's ``ray.util`` (``latticaray.util.state``)."""
