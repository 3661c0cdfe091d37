# The clipline image: the Prefect worker runs flows in it, and Ray nodes (ray up, KubeRay) use it
# so that driver, head and workers run the same code. Build from the repository root:
#   docker build -f infra/clipline.Dockerfile -t clipline:latest .
# For GPU nodes build on a CUDA base instead, e.g. --build-arg BASE=rayproject/ray:2.60.0-py311-gpu
ARG BASE=python:3.11-slim
FROM ${BASE}
USER root
WORKDIR /opt/clipline
COPY pyproject.toml README.md ./
COPY clipline ./clipline
RUN pip install --no-cache-dir . s3fs && python -c "import clipline.flows.cli"
# data, checkpoints and the catalog live on a volume shared by every node at the same path
ENV CLIPLINE_DATA_DIR=/data/clipline
WORKDIR /data
CMD ["clipline", "--help"]
