"""The proxy-to-node replica protocol, both ends: paths and headers, the batch
codec, the client and its pipelines."""
