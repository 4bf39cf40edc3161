# medexplain: the service with the bundled demo model. One Dockerfile, two images:
#   docker build --target cpu -t medexplain:cpu .   (the default target: the last stage is gpu,
#   docker build --target gpu -t medexplain:gpu .    so name the one you want)
# Both run as a non-root user on a read-only root file system, serve HTTP on
# MEDEXPLAIN_PORT and, when MEDEXPLAIN_DICOM_PORT is set, DICOM C-STORE.

# The CUDA runtime with cuDNN that onnxruntime-gpu is built against: 1.31's CUDA provider
# links libcudart.so.13 and libcublas.so.13 (objdump -p) and loads cuDNN 9 at run time.
# An older onnxruntime-gpu pin needs the matching CUDA 12 image instead.
# Ref: https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDEXPLAIN_HOST=0.0.0.0 \
    MEDEXPLAIN_PORT=8000 \
    MEDEXPLAIN_MODELS=/app/models
# onnxruntime links against OpenMP at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/docker/install.sh /usr/local/bin/medexplain-install
COPY service ./service
COPY schemas ./schemas
RUN medexplain-install "onnxruntime>=1.18"
COPY models ./models
# Uploads are held in memory only; the service needs no writable folder.
RUN useradd --system --uid 10001 medexplain
USER 10001
EXPOSE 8000 11112
# Liveness on whatever port the container is configured for (MEDEXPLAIN_PORT); over HTTPS
# when MEDEXPLAIN_TLS_CERTFILE is set, showing the service's own certificate (which a
# MEDEXPLAIN_TLS_CLIENT_CA that signed it accepts) and not checking the server's (itself).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request; e = os.environ; cert = e.get('MEDEXPLAIN_TLS_CERTFILE'); tls = cert and ssl._create_unverified_context(); tls and tls.load_cert_chain(cert, e['MEDEXPLAIN_TLS_KEYFILE']); url = ('https' if tls else 'http') + '://127.0.0.1:' + e.get('MEDEXPLAIN_PORT', '8000') + '/healthz'; sys.exit(urllib.request.urlopen(url, timeout=2, context=tls or None).status != 200)"]
CMD ["medexplain", "serve"]

FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDEXPLAIN_HOST=0.0.0.0 \
    MEDEXPLAIN_PORT=8000 \
    MEDEXPLAIN_MODELS=/app/models \
    MEDEXPLAIN_PROVIDERS=cuda \
    VIRTUAL_ENV=/opt/medexplain \
    PATH=/opt/medexplain/bin:$PATH
# Ubuntu's Python (3.12 on 24.04) in a virtual environment: the system one is
# externally managed (PEP 668).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/medexplain
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/docker/install.sh /usr/local/bin/medexplain-install
COPY service ./service
COPY schemas ./schemas
RUN medexplain-install "onnxruntime-gpu>=1.18"
COPY models ./models
RUN useradd --system --uid 10001 medexplain
USER 10001
EXPOSE 8000 11112
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request; e = os.environ; cert = e.get('MEDEXPLAIN_TLS_CERTFILE'); tls = cert and ssl._create_unverified_context(); tls and tls.load_cert_chain(cert, e['MEDEXPLAIN_TLS_KEYFILE']); url = ('https' if tls else 'http') + '://127.0.0.1:' + e.get('MEDEXPLAIN_PORT', '8000') + '/healthz'; sys.exit(urllib.request.urlopen(url, timeout=2, context=tls or None).status != 200)"]
CMD ["medexplain", "serve"]
