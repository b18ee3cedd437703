"""The mesh: nodes that join an orchestrator, their leases, and forwarding."""
