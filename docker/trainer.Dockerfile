# syntax=docker/dockerfile:1
# The trainer, `winnow train` (and `winnow model init`): torch and torchvision
# (their CUDA libraries come as NVIDIA's wheels), ONNX export, ONNX Runtime for
# the parity check of every export.
#
#   docker build -f docker/trainer.Dockerfile -t winnow-trainer .   # from the repository root

# python:3.11.14-slim-bookworm, pinned by tag and digest. The digest is the one public
# Dockerfiles pin for this tag; it was not checked against the registry here (no network):
# check it with `docker buildx imagetools inspect python:3.11.14-slim-bookworm` when you
# bump it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/winnow
WORKDIR /src
COPY pyproject.toml README.md docker/constraints.txt ./
COPY infra/ infra/
COPY schemas/ schemas/
COPY service/ service/
COPY trainer/ trainer/
COPY winnow/ winnow/
# The [trainer] extra, every version from constraints.txt.
RUN /opt/winnow/bin/pip install --no-cache-dir --constraint constraints.txt ".[trainer]"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 winnow \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin winnow \
    && install --directory --owner=10001 --group=10001 --mode=0750 /data
COPY --from=build /opt/winnow /opt/winnow
# The root filesystem is read-only in the chart: HOME and every cache live in /tmp,
# the sample store and checkpoints on the volume at /data.
ENV PATH=/opt/winnow/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WINNOW_TRAINER_DATA_DIR=/data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 9100
ENTRYPOINT ["winnow"]
CMD ["train"]
