"""zlocal's CPU kernels (C sources beside them) and the weight-only quantized modules on them."""
