# The image of the RayService (rayservice.yaml): Ray 2.60 with deploylab's serving code and the student's
# ONNX model. Not built by the course (no registry is reachable where it is built and tested);
# checked with hadolint by tests/test_k8s_manifests.py. Build it where you can pull rayproject/ray:
#   mkdir -p docker/ray-model && cp data/artefacts/workshop/serve_student_fp32.{onnx,card.json} docker/ray-model/
#   docker build -f deploy/k8s/ray.Dockerfile -t deploylab-ray:2.60.0 .
# (the build context is the repository root; .dockerignore lets deploylab/, docker/ and the lock file in)
FROM rayproject/ray:2.60.0-py311-cpu
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores a Docker HEALTHCHECK; KubeRay gives the Ray pods their own probes
# the lock's versions of what the serving code imports besides Ray (Ray's own pins stay as they are)
COPY requirements/lock.txt /tmp/lock.txt
RUN grep -E '^(onnxruntime|numpy|pillow|simplejpeg|pyyaml|psutil|starlette)==' /tmp/lock.txt > /tmp/serve.txt \
 && pip install --no-cache-dir -r /tmp/serve.txt \
 && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.14.1" \
 && rm /tmp/lock.txt /tmp/serve.txt
COPY --chown=1000:100 deploylab/ /app/deploylab/
COPY --chown=1000:100 docker/ray-model/ /app/model/
ENV PYTHONPATH=/app RAY_USAGE_STATS_ENABLED=0
USER 1000
