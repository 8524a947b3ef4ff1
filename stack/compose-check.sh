#!/usr/bin/env bash
# Validate docker-compose.yml with Docker Compose v2 (`docker compose config -q`).
# This machine has the docker client but no compose plugin and no engine, so
# when `docker compose` is missing the plugin is built once from the Go module
# proxy into .local/bin (config validation needs no engine).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMPOSE_VERSION=v2.29.7
cd "$ROOT"
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    docker compose config -q
    echo "docker-compose.yml: valid (docker compose $(docker compose version --short))"
    exit 0
fi
bin="$ROOT/.local/bin/docker-compose-$COMPOSE_VERSION"
if [ ! -x "$bin" ]; then
    if ! command -v go >/dev/null 2>&1; then
        echo "compose-check: skipped: neither 'docker compose' nor Go (to build it) is available"
        exit 0
    fi
    echo "compose-check: building docker compose $COMPOSE_VERSION from the Go module proxy (once)"
    mkdir -p "$ROOT/.local/bin" "$ROOT/.local/go-build"
    GOBIN="$ROOT/.local/go-build" go install "github.com/docker/compose/v2/cmd@$COMPOSE_VERSION" >"$ROOT/.local/go-build/build.log" 2>&1 \
        || { echo "compose-check: building docker compose failed; see .local/go-build/build.log" >&2; exit 1; }
    mv "$ROOT/.local/go-build/cmd" "$bin"
fi
"$bin" config -q
echo "docker-compose.yml: valid (docker compose $COMPOSE_VERSION, standalone)"
