# medexplain: the service with the bundled demo model.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MEDEXPLAIN_HOST=0.0.0.0 \
    MEDEXPLAIN_PORT=8000 \
    MEDEXPLAIN_MODELS=/app/models

# onnxruntime links against OpenMP at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY schemas ./schemas
RUN pip install .
COPY models ./models

# Uploads are held in memory only; the service needs no writable folder.
RUN useradd --system --uid 10001 medexplain
USER medexplain

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
CMD ["medexplain", "serve"]
