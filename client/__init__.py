"""The stepd client library: the rlx-optim ``Optimizer`` contract over HTTP, shared memory and
in-process transports. Until the transports land, ``kernels.create_optimizer`` is the
in-process optimizer they will wrap."""
