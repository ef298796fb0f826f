#!/usr/bin/env bash
# Build the ml-api image (docker/Dockerfile) and tag it ml-api:<MODEL_VERSION>.
#
# Two passes over one build cache: the first exports only the trained bundle
# (target `bundle`) to read the model checksum and backend from its manifest;
# the second builds the runtime image with them in its OCI labels (Dockerfile
# labels cannot read a file): the lean ONNX image for an `onnx` bundle, the
# scikit-learn-capable one for an `sklearn` bundle (the Dockerfile would pick
# the same by itself; passing it here only makes the label exact).
# Everything but the labels comes from cache in the second pass.
#
# With MODEL_FILE (a fitted model saved with joblib) the image bakes that
# model, packaged by `python -m training package` inside the build, instead of
# training: its file and REFERENCE_DATA (optional CSV) go into a FROM-scratch
# image of their own (ml-api-usermodel:<digest>, removed afterwards), which the
# Dockerfile's `package` stage mounts; the main build context stays the
# allow-listed source tree. TARGET and FEATURES are the packager's --target and
# --features, PACKAGE_ARGS any more of its options.
#
# Environment: MODEL_VERSION (1.0.0), MODEL_NAME (iris), DATASET (iris),
# PYTHON_BASE_IMAGE (python:3.12-slim-bookworm), IMAGE_NAME (ml-api),
# IMAGE_TAG (MODEL_VERSION), TRAIN_ARGS (more `python -m training` options,
# e.g. --no-onnx), RUNTIME_DEPS (auto: from the manifest),
# BREAK_BUNDLE (tests only: 1 bakes in a bundle the service refuses),
# CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt; passed as a BuildKit secret
# when the file exists), PYTHON (python3, to read the manifest).
set -euo pipefail

die() { echo "[build-image] $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL_VERSION="${MODEL_VERSION:-1.0.0}"
MODEL_NAME="${MODEL_NAME:-iris}"
DATASET="${DATASET:-iris}"
BASE="${PYTHON_BASE_IMAGE:-python:3.12-slim-bookworm}"
IMAGE_NAME="${IMAGE_NAME:-ml-api}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PYTHON="${PYTHON:-python3}"
TAG="$IMAGE_NAME:${IMAGE_TAG:-$MODEL_VERSION}"
RUNTIME_DEPS="${RUNTIME_DEPS:-auto}"

common=(
    -f "$ROOT/docker/Dockerfile"
    --build-arg "BASE_IMAGE=$BASE"
    --build-arg "MODEL_NAME=$MODEL_NAME"
    --build-arg "MODEL_VERSION=$MODEL_VERSION"
    --build-arg "DATASET=$DATASET"
    --build-arg "BREAK_BUNDLE=${BREAK_BUNDLE:-0}"
    --build-arg "TRAIN_ARGS=${TRAIN_ARGS:-}"
)
if [ -s "$CA_BUNDLE" ]; then
    common+=(--secret "id=ca,src=$CA_BUNDLE")
fi
if [ -n "${BUILD_PROGRESS:-}" ]; then common+=(--progress "$BUILD_PROGRESS"); fi

out="$(mktemp -d)"
usermodel_image=
cleanup() {
    rm -rf "$out"
    if [ -n "$usermodel_image" ]; then docker image rm "$usermodel_image" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

if [ -n "${MODEL_FILE:-}" ]; then
    [ -f "$MODEL_FILE" ] || die "MODEL_FILE $MODEL_FILE: no such file"
    if [ -n "${REFERENCE_DATA:-}" ]; then
        [ -f "$REFERENCE_DATA" ] || die "REFERENCE_DATA $REFERENCE_DATA: no such file"
    fi
    mkdir -p "$out/usermodel/files"
    # A .skops file keeps its suffix: the packager loads it with skops' safe
    # loader, never unpickles it. Any other file is a (joblib) pickle.
    case "$MODEL_FILE" in
        *.skops) cp "$MODEL_FILE" "$out/usermodel/files/model.skops" ;;
        *) cp "$MODEL_FILE" "$out/usermodel/files/model.joblib" ;;
    esac
    if [ -n "${REFERENCE_DATA:-}" ]; then cp "$REFERENCE_DATA" "$out/usermodel/files/reference.csv"; fi
    printf 'FROM scratch\nCOPY . /\n' > "$out/usermodel/Dockerfile"
    # Named by content, so builds of different models never share a tag.
    digest="$(cat "$out"/usermodel/files/* | sha256sum | cut -c1-16)"
    usermodel_image="ml-api-usermodel:$digest"
    "$ROOT/docker/docker-build.sh" -q -f "$out/usermodel/Dockerfile" -t "$usermodel_image" \
        "$out/usermodel/files" >/dev/null
    package_args="${PACKAGE_ARGS:-}"
    if [ -n "${TARGET:-}" ]; then package_args+=" --target $TARGET"; fi
    if [ -n "${FEATURES:-}" ]; then package_args+=" --features $FEATURES"; fi
    common+=(
        --build-arg "MODEL_SOURCE=package"
        --build-arg "BUILD_DEPS=deps-boosting"
        --build-arg "USER_MODEL_IMAGE=$usermodel_image"
        --build-arg "PACKAGE_ARGS=$package_args"
        --build-arg "DATASET=package:$(basename "$MODEL_FILE")"
    )
    echo "[build-image] packaging $MODEL_FILE as $MODEL_NAME $MODEL_VERSION on $BASE" >&2
else
    echo "[build-image] training $MODEL_NAME $MODEL_VERSION on $BASE" >&2
fi
"$ROOT/docker/docker-build.sh" "${common[@]}" --target bundle -o "type=local,dest=$out" "$ROOT"
# The drift rules of this bundle, where compose's Prometheus loads them (the image
# carries them too, /app/prometheus/rules/drift.yml: the Swarm stack's source).
"$ROOT/docker/docker-build.sh" "${common[@]}" --target drift-rules \
    -o "type=local,dest=$ROOT/docker/prometheus/rules" "$ROOT"

read -r sha backend < <("$PYTHON" - "$out/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
files = m["files"]
entry = files.get("model.onnx") or files.get("model.joblib") or files["model.skops"]
print(entry["sha256"] if isinstance(entry, dict) else entry, m["backend"])
PY
)
if [ "$RUNTIME_DEPS" = auto ]; then RUNTIME_DEPS="$backend"; fi
vcs_ref="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
created="$(git -C "$ROOT" log -1 --format=%cI 2>/dev/null || echo unknown)"

echo "[build-image] building $TAG ($RUNTIME_DEPS runtime, model sha256 $sha)" >&2
"$ROOT/docker/docker-build.sh" "${common[@]}" --target runtime \
    --build-arg "MODEL_SHA256=$sha" \
    --build-arg "RUNTIME_DEPS=$RUNTIME_DEPS" \
    --build-arg "VCS_REF=$vcs_ref" \
    --build-arg "CREATED=$created" \
    -t "$TAG" "$ROOT"
docker image ls "$TAG" --format '[build-image] {{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' >&2
