# The image the Kubeflow components run in (pipeline.base_image): Python, kfp and Vitrine.
# Build and push: docker build -t <registry>/vitrine:0.1.0 . && docker push <registry>/vitrine:0.1.0
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
WORKDIR /opt/vitrine
COPY pyproject.toml README.md ./
COPY model model
COPY components components
COPY serving serving
COPY dags dags
COPY params.yaml ./
RUN pip install ".[workflow]"
# Components call the `vitrine` step functions; `vitrine serve` runs the search service.
CMD ["vitrine", "--help"]
