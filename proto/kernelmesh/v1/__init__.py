"""Generated gRPC stubs of the kernelmesh.v1 contract (built by setup.py, never committed)."""
