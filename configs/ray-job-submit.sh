#!/usr/bin/env bash
# Submit a manifest run to an existing Ray cluster as a Ray Job. The driver runs on the
# head node and finds the cluster through RAY_ADDRESS, which Ray Jobs set for it.
#   RAY_ADDRESS=http://<head>:8265 configs/ray-job-submit.sh configs/cluster.yaml
# The driver runs in Ray's uploaded copy of this directory, so the manifest's paths and its
# output_root must be absolute (on storage every node mounts) or hub repos: relative ones
# would point into the copy (converter refuses such a manifest and says so).
set -euo pipefail
MANIFEST=${1:-configs/cluster.yaml}
ray job submit \
  --working-dir . \
  --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1"}}' \
  -- converter run "$MANIFEST" --max-concurrent 64
