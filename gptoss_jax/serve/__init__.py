"""``gptoss-jax serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a continuous-batching scheduler.

:mod:`gptoss_jax.serve.engine` — the scheduler (slots, prefill/decode interleaving, per-row sampling);
:mod:`gptoss_jax.serve.openai_api` — the endpoints and the OpenAI ↔ harmony conversions. See docs/SERVING.md.
"""
