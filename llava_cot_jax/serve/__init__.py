"""An OpenAI-compatible HTTP server over the searcher (`mode = "serve"`): `config.py` its settings, `protocol.py`
the request and response formats, `engine.py` the batching worker that owns the model, `app.py` the FastAPI
routes and the entry point. See docs/serving.md."""
