# syntax=docker/dockerfile:1
# The labeling side: `winnow label-app` (the web app) and `winnow label-studio-bridge`.
# FastAPI, Jinja2 and httpx; no ONNX Runtime, no torch.
#
#   docker build -f docker/label-app.Dockerfile -t winnow-label-app .   # from the repository root

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
# The [label-app] extra, every version from constraints.txt.
RUN /opt/winnow/bin/pip install --no-cache-dir --constraint constraints.txt ".[label-app]"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 winnow \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin winnow
COPY --from=build /opt/winnow /opt/winnow
ENV PATH=/opt/winnow/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8100 8200
ENTRYPOINT ["winnow"]
CMD ["label-app", "--host", "0.0.0.0"]
