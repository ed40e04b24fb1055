"""The proxy: places keys on nodes and coordinates requests to them."""
