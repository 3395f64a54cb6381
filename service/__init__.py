"""The stepd server: parameter store, HTTP API, shared-memory listener, checkpoints, CLI.

For now it holds the command-line entry point; the server lands on top of ``kernels``.
"""
