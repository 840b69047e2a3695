# pocket-tts-server in a container: the module, its requirements, nothing else.
#
#   CPU (default):  docker build -t pocket-tts-server .
#   CUDA:           docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                     -t pocket-tts-server:cuda .   (run with --gpus all)
#
# The install is .ci/run's own command (`pip install -r requirements.txt`, so the image can also
# run the test suite), after torch from the index the build argument names. State lives in
# /data (voices, latent cache, the model download): mount one volume there, shared by replicas.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface \
    POCKET_TTS_HOST=0.0.0.0 \
    POCKET_TTS_PORT=8000 \
    POCKET_TTS_VOICES_DIR=/data/voices \
    POCKET_TTS_CACHE_DIR=/data/cache

WORKDIR /app
COPY requirements.txt .
RUN python -m pip install --quiet --disable-pip-version-check --index-url "$TORCH_INDEX" \
        torch==2.13.0 \
    && python -m pip install --quiet --disable-pip-version-check -r requirements.txt
COPY pocket_tts_server.py pocket-tts-logo.png ./

RUN useradd --create-home --uid 1000 tts && mkdir -p /data && chown tts /data
USER tts
EXPOSE 8000 8001 10200
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
# SIGTERM drains: running streams finish (--drain_seconds), /ready answers 503 meanwhile.
CMD ["python", "pocket_tts_server.py", "--stream", "--ws_port", "8001"]
