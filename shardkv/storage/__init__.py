"""Storage engines: where a node keeps its records."""
