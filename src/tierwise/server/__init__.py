"""The tier server (`tierwise serve`): OIP v2 over HTTP, dynamic batching, Prometheus metrics."""
