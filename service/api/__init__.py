"""HTTP routers, one module per resource; thin: they parse, call the store, serialise."""
