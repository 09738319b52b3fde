# oodlab image: Ray's own image at the Ray version pyproject.toml pins (the cluster's nodes and the
# client must run the same Ray), Python 3.11, with the project installed from this tree and its pins.
#   docker build -t REGISTRY/oodlab:ray2.60.0-cpu .                       # CPU
#   docker build -t REGISTRY/oodlab:ray2.60.0-gpu --build-arg VARIANT=gpu .   # CUDA (Ray's -gpu image)
# Used by every node of cluster.yaml (the gpu variant) and by k8s/*.yaml (docs/cluster.md);
# tests/test_cluster.py checks the pins agree. Ray token authentication is not switched off here:
# cluster.yaml and k8s/rayjob.yaml switch it on (RAY_AUTH_MODE=token) and bring the token.
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}
ARG VARIANT
# CPU variant: torch's CPU wheels (no CUDA libraries); GPU variant: PyPI's default CUDA wheels.
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/oodlab
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users oodlab ./oodlab
RUN if [ "$VARIANT" = "cpu" ]; then EXTRA="--extra-index-url $TORCH_INDEX_CPU"; else EXTRA=""; fi && \
    pip install --no-cache-dir $EXTRA -e . && \
    python -c "import ray, optuna, mlflow, torch; print('ray', ray.__version__, 'torch', torch.__version__)"
COPY --chown=ray:users studies ./studies
COPY --chown=ray:users k8s/run_study.sh ./k8s/run_study.sh

ENV OODLAB_DATA_DIR=/home/ray/oodlab-data PYTHONUNBUFFERED=1
RUN mkdir -p /home/ray/oodlab-data
