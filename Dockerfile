# The image for GKE (launch/gke.py) and any container runtime: built by the same set-up
# script that `make test` and `make demo` run (launch/setup_env.sh), with the TPU extra.
#
#   docker build -t REGISTRY/audiodiff-jax:TAG . && docker push REGISTRY/audiodiff-jax:TAG
#   python -m launch.gke --image=REGISTRY/audiodiff-jax:TAG ...
FROM python:3.11-slim
WORKDIR /opt/audiodiff-jax
COPY . .
RUN AUDIODIFF_EXTRAS=tpu AUDIODIFF_SYSTEM_PACKAGES=none PYTHON=python3 bash launch/setup_env.sh /opt/venv \
    && rm -rf /root/.cache/pip
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
CMD ["audiodiff-train", "--help"]
