"""``sacb train``: configuration, data sources, the training loop and packaging."""
