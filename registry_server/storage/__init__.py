"""Storage: a small file-like driver interface, its backends, and the metadata index."""
