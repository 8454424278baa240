"""HTTP service (``omnigen serve``): one shared pipeline behind a bounded job queue.

``settings`` holds the limits, ``worker`` the queue and the thread that runs the pipeline (no web
framework there), ``inputs`` request parsing, limits and the error format, ``app`` the FastAPI routes,
``cli`` the subcommand. Importing this package imports neither FastAPI nor torch.
"""
