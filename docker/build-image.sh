#!/usr/bin/env bash
# Build the ml-api image (docker/Dockerfile) and tag it ml-api:<MODEL_VERSION>.
#
# Two passes over one build cache: the first exports only the trained bundle
# (target `bundle`) to read the model checksum from its manifest; the second
# builds the runtime image with that checksum in its OCI labels (Dockerfile
# labels cannot read a file). Everything but the labels comes from cache in
# the second pass.
#
# Environment: MODEL_VERSION (1.0.0), MODEL_NAME (iris), DATASET (iris),
# PYTHON_BASE_IMAGE (python:3.12-slim-bookworm), IMAGE_NAME (ml-api),
# CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt; passed as a BuildKit secret
# when the file exists), PYTHON (python3, to read the manifest).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL_VERSION="${MODEL_VERSION:-1.0.0}"
MODEL_NAME="${MODEL_NAME:-iris}"
DATASET="${DATASET:-iris}"
BASE="${PYTHON_BASE_IMAGE:-python:3.12-slim-bookworm}"
IMAGE_NAME="${IMAGE_NAME:-ml-api}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PYTHON="${PYTHON:-python3}"
TAG="$IMAGE_NAME:$MODEL_VERSION"

common=(
    -f "$ROOT/docker/Dockerfile"
    --build-arg "BASE_IMAGE=$BASE"
    --build-arg "MODEL_NAME=$MODEL_NAME"
    --build-arg "MODEL_VERSION=$MODEL_VERSION"
    --build-arg "DATASET=$DATASET"
)
if [ -s "$CA_BUNDLE" ]; then
    common+=(--secret "id=ca,src=$CA_BUNDLE")
fi
if [ -n "${BUILD_PROGRESS:-}" ]; then common+=(--progress "$BUILD_PROGRESS"); fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "[build-image] training $MODEL_NAME $MODEL_VERSION on $BASE" >&2
"$ROOT/docker/docker-build.sh" "${common[@]}" --target bundle -o "type=local,dest=$out" "$ROOT"

sha="$("$PYTHON" - "$out/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
files = m["files"]
entry = files.get("model.onnx") or files["model.joblib"]
print(entry["sha256"] if isinstance(entry, dict) else entry)
PY
)"
vcs_ref="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
created="$(git -C "$ROOT" log -1 --format=%cI 2>/dev/null || echo unknown)"

echo "[build-image] building $TAG (model.onnx sha256 $sha)" >&2
"$ROOT/docker/docker-build.sh" "${common[@]}" --target runtime \
    --build-arg "MODEL_SHA256=$sha" \
    --build-arg "VCS_REF=$vcs_ref" \
    --build-arg "CREATED=$created" \
    -t "$TAG" "$ROOT"
docker image ls "$TAG" --format '[build-image] {{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' >&2
