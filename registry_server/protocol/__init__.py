"""Pure OCI rules: no I/O, no web framework, no storage."""
