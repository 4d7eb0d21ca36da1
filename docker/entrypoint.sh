#!/bin/sh
# Serve every bundle under $KILN_MODELS (a folder holding kiln.json, or folders of them).
#   kiln-entrypoint                      -> kiln serve /models/a /models/b --host 0.0.0.0 --port 8000
#   kiln-entrypoint --max-batch 16       -> the same with extra `kiln serve` flags
#   kiln-entrypoint kiln bench ...       -> any other command runs as is
# With KILN_BUILD_ENGINES=1 (the GPU image), TensorRT engines missing for this GPU are built first;
# bundles on a read-only mount are copied to $KILN_ENGINE_DIR for that.
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

models="${KILN_MODELS:-/models}"
# Defaults first so flags given to the container override them (argparse keeps the last).
set -- --host "${KILN_HOST:-0.0.0.0}" --port "${KILN_PORT:-8000}" "$@"
found=0
if [ -f "$models/kiln.json" ]; then
    bundles="$models"
    found=1
else
    bundles=""
    for dir in "$models"/*/; do
        if [ -f "${dir}kiln.json" ]; then
            bundles="$bundles ${dir%/}"
            found=1
        fi
    done
fi
if [ "$found" = 0 ]; then
    echo "kiln-entrypoint: no bundle under $models (mount one: -v \$PWD/runs/digits:$models/digits:ro)" >&2
    exit 2
fi

if [ "${KILN_BUILD_ENGINES:-0}" = "1" ]; then
    # shellcheck disable=SC2086 # bundle paths are split on purpose (no spaces in bundle names)
    bundles=$(python3 /opt/kiln/prepare_engines.py $bundles)
fi

# shellcheck disable=SC2086
exec kiln serve $bundles "$@"
