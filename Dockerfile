# syntax=docker/dockerfile:1
# dinoserve images, two build targets:
#   gateway  the HTTP gateway (`dinoserve serve`), no torch: runs beside an NGC Triton on GPUs, or alone with
#            the embedded Triton from the nvidia-pytriton wheel (CPU, ONNX Runtime)
#   trainer  CUDA PyTorch for `dinoserve train` (torchrun), `export` and `eval-knn`
# Build:  docker build --target gateway -t dinoserve-gateway:0.1.0 .
#         docker build --target trainer -t dinoserve-trainer:0.1.0 .
# Every Python package is pinned by deploy/constraints.txt: the versions the test suite passed with
# (regenerate with `.venv/bin/pip freeze --exclude-editable > deploy/constraints.txt` after `make install`).

FROM python:3.11.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# One unprivileged user for both images; uid 10001 matches the Kubernetes securityContext.
RUN useradd --system --no-log-init --uid 10001 --gid 0 --create-home --home-dir /home/dinoserve dinoserve


FROM base AS gateway-build
WORKDIR /src
RUN python -m venv /opt/dinoserve
COPY deploy/constraints.txt deploy/constraints.txt
COPY pyproject.toml README.md ./
# The gateway's packages only: the command line, the shared core and the service (no trainer, no torch).
COPY core/ core/
COPY dinoserve/ dinoserve/
COPY service/ service/
# A regular (not editable) install: the venv alone is copied into the final stage.
RUN /opt/dinoserve/bin/pip install --no-cache-dir --constraint deploy/constraints.txt ".[serve]"


FROM base AS gateway
COPY --from=gateway-build /opt/dinoserve /opt/dinoserve
# The demo bundle, so that `docker run -p 8080:8080 dinoserve-gateway:0.1.0` serves something; mount another
# model repository on /models (and set DINOSERVE_MODEL) to serve your own.
COPY demo/model_repository/ /models/
RUN install --directory --owner=dinoserve --group=0 --mode=0770 /data
ENV PATH=/opt/dinoserve/bin:$PATH \
    DINOSERVE_HOST=0.0.0.0 \
    DINOSERVE_PORT=8080 \
    DINOSERVE_REPOSITORY=/models \
    DINOSERVE_MODEL=dinoserve-demo \
    DINOSERVE_DATA_DIR=/data
WORKDIR /home/dinoserve
USER 10001
EXPOSE 8080
VOLUME ["/data"]
# Liveness only: readiness (/readyz) waits for Triton, which may legitimately come up later.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DINOSERVE_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["dinoserve"]
CMD ["serve"]


FROM base AS trainer
WORKDIR /src
RUN python -m venv /opt/dinoserve
COPY deploy/constraints.txt deploy/constraints.txt
# torch and torchvision first and alone (as `make install` does): the Linux wheels on PyPI are the CUDA
# builds and bring their CUDA libraries with them, so no CUDA base image is needed, only the host driver.
RUN /opt/dinoserve/bin/pip install --no-cache-dir --constraint deploy/constraints.txt \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY core/ core/
COPY dinoserve/ dinoserve/
COPY service/ service/
COPY training/ training/
RUN /opt/dinoserve/bin/pip install --no-cache-dir --constraint deploy/constraints.txt ".[all]"
ENV PATH=/opt/dinoserve/bin:$PATH
WORKDIR /workspace
RUN chown dinoserve:0 /workspace
USER 10001
ENTRYPOINT ["dinoserve"]
CMD ["--help"]
