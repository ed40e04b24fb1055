"""A storage node: the data API over one storage engine."""
