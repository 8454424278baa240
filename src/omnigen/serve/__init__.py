"""HTTP service (``omnigen serve``): one shared pipeline behind a bounded job queue.

``settings`` holds the limits, ``worker`` the queue and the thread that runs the pipeline (no web
framework there), ``inputs`` request parsing and limits, ``decode`` the uploads' checks and the bounded
pool that decodes them off the event loop, ``errors`` the error format (OpenAI's), ``jobs`` the
generation path every route takes, ``openai`` the routes (OpenAI's Images API with our fields as
extensions), ``app`` the FastAPI app (state, API key, error handlers, ``/health``), ``server`` the uvicorn
server (slow-client limits, the draining shutdown), ``cli`` the subcommand. Importing this package
imports neither FastAPI nor torch.
"""
