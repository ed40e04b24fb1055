"""The proxy's side of the cluster map: what it routes by (L{view}), how it
changes the map at the nodes (L{proposer}), and how it keeps up (L{sync})."""
