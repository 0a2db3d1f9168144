#!/usr/bin/env bash
# Train on this machine: launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
exec python -m alexnet_jax.main --config="$config" --workdir="$workdir" "$@"
