"""``sagellm bench``: the workloads of ``shared/bench/README.md``, run exactly as defined there.

``workloads.py`` holds one function per workload, ``report.py`` the table and the ratios to a
baseline (vLLM's numbers for the same card), ``serve.py`` the OpenAI-streaming client for the
serve rows and ``main.py`` the command line. ``soak.py`` (with ``soak_*.py``) is the soak: does a server
survive many streaming clients that hang up and send hostile requests (``--workloads soak``).
"""

from __future__ import annotations
