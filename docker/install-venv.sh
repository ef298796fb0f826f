#!/bin/sh
# Build-time only (docker/Dockerfile, stages deps and deps-onnx): create the
# virtual environment /opt/venv from one lock file, wheels only (the image has
# no compilers and needs none), and drop what serving never loads.
#
#   install-venv.sh <lock file>
#
# Behind a TLS-intercepting proxy the CA bundle arrives as the BuildKit secret
# `ca` (never a layer).
set -eu
lock="$1"
if [ -s /run/secrets/ca ]; then
    export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca
fi
python3 -m venv /opt/venv
/opt/venv/bin/python -m pip install --only-binary=:all: -r "$lock"
/opt/venv/bin/python -m pip uninstall -y -q pip setuptools wheel 2>/dev/null || true
site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# Test suites shipped inside wheels (scipy, sklearn, numpy...): ~65 MB.
find /opt/venv/lib -type d -name tests -prune -exec rm -rf {} +
# ONNX Runtime's Python tooling (quantization, transformer optimisers,
# profiling helpers) is never imported to run an inference session, and
# libonnxruntime.so is the C API library for C/C++ callers: the Python binding
# carries the runtime itself and never loads it (35 MB). The e2e tier serves
# predictions from the result (tests/e2e/test_image.py).
rm -rf "$site/onnxruntime/tools" "$site/onnxruntime/transformers" "$site/onnxruntime/quantization"
rm -f "$site"/onnxruntime/capi/libonnxruntime.so.*
# Cython sources shipped next to compiled modules.
find "$site" \( -name '*.pyx' -o -name '*.pxd' \) -type f -delete
# Debug information in extension modules built with it (uvloop: 12 of its
# 13.6 MB). Only files that carry it are touched, so auditwheel-patched
# libraries stay byte for byte. Skipped when binutils could not be installed.
if command -v readelf >/dev/null 2>&1 && command -v strip >/dev/null 2>&1; then
    find "$site" -name '*.so' -type f | while read -r lib; do
        if readelf -S -W "$lib" 2>/dev/null | grep -q '[.]debug_info'; then
            strip --strip-debug "$lib"
        fi
    done
fi
# Type stubs and headers are for compilers and type checkers.
find "$site" \( -name '*.pyi' -o -name '*.h' -o -name '*.hpp' \) -type f -delete
find "$site" -type d -name include -path '*/numpy/*' -prune -exec rm -rf {} +
