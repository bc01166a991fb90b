# lookalike on CPU: one image for the API and the one-shot indexer (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# CPU-only torch first and pinned, so nothing pulls the CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY embedder embedder
COPY training training
COPY service service
COPY lookalike lookalike
RUN pip install .

RUN useradd --create-home --uid 10001 lookalike && mkdir -p /data && chown lookalike /data
USER lookalike
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
ENTRYPOINT ["lookalike"]
# Settings come from LOOKALIKE_* variables (see docker-compose.yml) or a mounted --config file.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
