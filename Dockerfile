# syntax=docker/dockerfile:1
#
# stepd images. The default target (the last stage, `runtime`) is a small CPU image:
#
#     docker build -t stepd .                           # CPU: python:3.11-slim, no compiler
#     docker build -t stepd:cuda --target cuda .        # GPU: CUDA 12 runtime + cupy-cuda12x[ctk]
#     docker run --rm -p 127.0.0.1:8000:8000 -v stepd-data:/data stepd
#     docker run --rm --gpus all -p 127.0.0.1:8000:8000 stepd:cuda
#
# Both serve on 0.0.0.0:8000 inside the container, keep checkpoints under /data/checkpoints
# (a volume owned by the unprivileged `stepd` user) and report health on /healthz. Settings
# come from STEPD_* environment variables as everywhere else (STEPD_TOKEN, STEPD_AUTOSAVE_EVERY…).

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# build: a venv with stepd[server], and the CPU kernels compiled once with g++.
FROM python:${PYTHON_VERSION}-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STEPD_CACHE_DIR=/opt/stepd/cache
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stepd ./stepd
COPY kernels ./kernels
COPY service ./service
COPY client ./client
RUN pip install ".[server]"
# Compile the CPU kernels from the installed package (run outside /src so that the import
# resolves to the venv's copy, whose sources are what the cache key hashes).
WORKDIR /
RUN python -c "from stepd.kernels import get_backend; print(get_backend('cpu').library_path)" \
    && cp /opt/stepd/cache/kernels/libstepd_cpu-*.so /opt/stepd/libstepd_cpu.so \
    && python -c "from stepd.kernels.backends.build import build_bind_library as b; print(b())" \
    && cp /opt/stepd/cache/kernels/libstepd_bind-*.so /opt/stepd/libstepd_bind.so

# ---------------------------------------------------------------------------------------------
# cuda: `--target cuda`. The runtime image has the driver interface but no CUDA headers, and
# CuPy includes cuda_runtime.h / cuda_fp16.h in every kernel it compiles (its own elementwise
# ops too): the `gpu` extra installs cupy-cuda12x[ctk], the CUDA toolkit wheels (NVRTC and
# cudart with its headers), rather than a devel image. stepd compiles its kernels through
# NVRTC at start-up (a self-test decides whether the GPU is used) and caches the binary.
FROM ${CUDA_IMAGE} AS cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    STEPD_DEVICE=cuda
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stepd ./stepd
COPY kernels ./kernels
COPY service ./service
COPY client ./client
RUN pip install ".[server,gpu]" && rm -rf /src
COPY examples /opt/stepd/examples
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin stepd \
    && mkdir -p /data/checkpoints \
    && chown -R stepd:stepd /data
USER stepd
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["stepd", "serve", "--host", "0.0.0.0", "--port", "8000", "--checkpoint-dir", "/data/checkpoints"]

# ---------------------------------------------------------------------------------------------
# runtime (default): the venv and the compiled kernels, no compiler. libgomp1 is the OpenMP
# runtime the kernels link against.
# The cache's lookup key includes the compiler's version, which needs a compiler: the library
# is named by STEPD_CPU_LIBRARY instead, which kernels/backends/build.py uses as is. It is built
# with -march=native: run the image on CPUs like the build machine's (a local
# `docker compose up --build` does).
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin stepd \
    && mkdir -p /data/checkpoints \
    && chown -R stepd:stepd /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/stepd/libstepd_cpu.so /opt/stepd/libstepd_cpu.so
COPY --from=build /opt/stepd/libstepd_bind.so /opt/stepd/libstepd_bind.so
COPY examples /opt/stepd/examples
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STEPD_CPU_LIBRARY=/opt/stepd/libstepd_cpu.so \
    STEPD_BIND_LIBRARY=/opt/stepd/libstepd_bind.so
USER stepd
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# urlopen raises (exit status 1) on a refused connection, a timeout or a non-2xx status.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["stepd", "serve", "--host", "0.0.0.0", "--port", "8000", "--checkpoint-dir", "/data/checkpoints"]
