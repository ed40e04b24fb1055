"""The web layer: the HTTP site, the data API routes, and the one table that
turns domain errors into statuses."""
