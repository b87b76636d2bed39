#!/usr/bin/env bash
# Everything splitinfer needs on a fresh machine: a venv with the package and its test tools, and a running
# RabbitMQ with the consistent-hash exchange plugin. Idempotent; VENV=path picks the venv, FRESH=1 rebuilds it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "splitinfer needs Python 3.11 (found $("$PYTHON" --version))" >&2
    exit 1
fi
if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then "$PYTHON" -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import splitinfer, tensorflow, keras, aio_pika" \
    || { echo "python dependencies failed to install" >&2; exit 1; }

# The broker: install it if absent, start it if stopped, enable the plugin the data plane routes with.
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "installing rabbitmq-server" >&2
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null
fi
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    echo "starting rabbitmq-server" >&2
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do
        rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break
        sleep 1
    done
fi
rabbitmq-diagnostics -q ping >/dev/null 2>&1 || { echo "RabbitMQ did not start" >&2; exit 1; }
rabbitmq-plugins enable --quiet rabbitmq_consistent_hash_exchange >/dev/null

# PostgreSQL (the result store's other backend; its tests use a scratch database on 127.0.0.1:5432): install it
# if absent (Debian's package), start it if stopped. Nothing else needs it: SQLite stays the default store.
if ! pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        echo "installing postgresql" >&2
        if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null \
            || echo "could not install postgresql: its tests will be skipped" >&2
    fi
    if command -v pg_lsclusters >/dev/null 2>&1; then
        echo "starting postgresql" >&2
        pg_lsclusters -h 2>/dev/null | while read -r version name _; do
            if [[ $(id -u) -eq 0 ]]; then pg_ctlcluster "$version" "$name" start || true
            else sudo pg_ctlcluster "$version" "$name" start || true; fi
        done
        for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
fi
echo "ready: $VENV/bin/splitinfer, broker at 127.0.0.1:5672$(pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null \
    && echo ', PostgreSQL at 127.0.0.1:5432')" >&2
