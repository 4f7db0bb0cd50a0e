"""Front ends: each a thin command over runtime/ (inference, chat, batch, serve with its
OpenAI schema, info, convert)."""
