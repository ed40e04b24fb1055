"""HTTP pieces shared by the node and the proxy."""
