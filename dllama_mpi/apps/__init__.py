"""Front ends: each a thin command over runtime/ (inference, batch, info, convert)."""
