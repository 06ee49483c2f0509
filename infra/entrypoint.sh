#!/bin/sh
# Runs `ringserve "$@"`. Workers tell their peers where to reach their torch.distributed
# rendezvous store (RINGSERVE_ADVERTISE_HOST); a container scaled to N replicas has no fixed
# name, so by default it advertises its own address on the compose / pod network.
set -e
# The example passwords of .env.example are public: a deployment never runs with them.
case "${RINGSERVE_NATS_PASSWORD:-}${RINGSERVE_REDIS_URL:-}" in
    *change-me*)
        echo "ringserve: refusing to start with the example passwords of .env.example; set your own in .env" >&2
        exit 64 ;;
esac
if [ -z "${RINGSERVE_ADVERTISE_HOST}" ]; then
    RINGSERVE_ADVERTISE_HOST="$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')"
    export RINGSERVE_ADVERTISE_HOST
fi
exec ringserve "$@"
