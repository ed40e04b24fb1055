"""The proxy's live dashboard: one page with its assets, and the ring drawn as arcs."""
