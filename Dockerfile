# The image every Kubeflow / Vertex AI Pipelines task of `unicon-tf compile --target kfp`
# runs in: unicon-tf with the `kfp` extra (each task is `python3 -m kfp.dsl.executor_main`
# calling a unicon_tf.components executor).
#
#   docker build -t unicon-tf:0.1.0 .                      # CPU tasks
#   docker build -t unicon-tf:0.1.0-gpu \
#       --build-arg TENSORFLOW='tensorflow[and-cuda]' .    # GPU tasks (stage `resources: {gpu: 1}`)
#   docker tag unicon-tf:0.1.0 REGISTRY/unicon-tf:0.1.0 && docker push REGISTRY/unicon-tf:0.1.0
#   unicon-tf compile pipelines/chest_ct.yaml --target kfp --output chest_ct.json \
#       --image REGISTRY/unicon-tf:0.1.0
FROM python:3.11-slim

ARG TENSORFLOW=tensorflow
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/unicon-tf
COPY setup.py README.md ./
COPY unicon_tf ./unicon_tf
RUN pip install "${TENSORFLOW}>=2.18,<2.22" ".[kfp]" \
    && python -c "import tensorflow, kfp, unicon_tf.kubeflow.tasks" \
    && unicon-tf --version

# tasks get their folders from KFP (artifact paths under /gcs, /minio, /s3 or a volume)
WORKDIR /tmp
