"""Serving: the asyncio engine, and the OpenAI-compatible HTTP server (``pagedkv serve``)."""
