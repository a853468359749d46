"""The HTTP front ends: Ollama's API under /api, OpenAI's under /v1, over one
core; errors (errors.py), bodies (body.py) and upstream calls (upstream.py)
shared by both."""
