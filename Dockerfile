# syntax=docker/dockerfile:1
# The patio image: the worker (`patio worker`), the client (`patio call`) and
# the Kubernetes operator (`python -m patio_operator`) in one small image.
#
#   docker build -t patio:dev .
#   hack/image/build.sh      # the same with buildah, offline base (tests use it)
#
# Stage 1 builds the project's wheel; stage 2 installs only that wheel (and
# its dependencies) into a virtualenv on a slim base, runs as a non-root user
# and works with a read-only root filesystem. tests/operator/test_image_build.py
# runs the same commands outside Docker.

ARG PYTHON_VERSION=3.11
# Any image with python, venv, pip and useradd; hack/image/build.sh passes one
# made from Debian packages (no registry needed).
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY patio ./patio
COPY operator/src ./operator/src
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
       "$(ls /wheels/patio-*.whl)[worker,kubernetes]" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin patio
# The Kubernetes examples' registry (spec.registry: tasks:rpc) ships in the
# image so that examples/k8s/*.yaml run without building anything else.
COPY examples/k8s/tasks.py /app/tasks.py
WORKDIR /app
USER 10001:10001
EXPOSE 15383 9383
ENTRYPOINT ["patio"]
CMD ["--help"]
