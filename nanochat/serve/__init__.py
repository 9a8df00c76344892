"""Serving: the last stage of the pipeline (`nanochat-run stage=serve`).

    scheduler.py  the core: one model replica, every active sequence in one forward per decode step
    prefix_cache.py  keys/values of earlier prompts (chat history) reused by later ones, LRU in a budget
    limits.py     request validation (nanochat's abuse limits) → OpenAI-style 400 errors
    app.py        FastAPI routes that only translate protocols (OpenAI, nanochat SSE) into scheduler requests
    schema.py     Pydantic models of the request/response bodies (/docs, /openapi.json)
    metrics.py    Prometheus counters and histograms (prometheus-client)
    static/index.html  the web UI (one file, no build step, no CDN)
"""
