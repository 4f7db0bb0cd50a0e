"""Front ends that drive the scheduler on rank 0: the OpenAI-compatible HTTP server
(serve.py, with its request schema in openai_schema.py) and the interactive chat (chat.py)."""
