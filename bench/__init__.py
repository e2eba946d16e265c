"""`python -m bench`: Berth's registry server against CNCF distribution 2.8, one run.

See docs/benchmarks.md for what is measured, how, and the latest results.
"""
