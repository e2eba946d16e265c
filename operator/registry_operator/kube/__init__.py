"""The Kubernetes API client layer: the only place that talks to the API server.

Everything here is synchronous (the official client is); callers run it off the event
loop. API errors are converted once, in `errors`, into the few kinds callers act on.
"""
