#!/bin/sh
# facestage container entrypoint: one image, the role is the first argument.
#
#   detector|embedder|swapper|enhancer [FLAGS...]  -> facestage-<stage> FLAGS...
#   orchestrator [FLAGS...]                        -> facestage serve FLAGS...
#   pull-models NAME [NAME...]                     -> facestage models pull --no-progress NAME
#                                                     --cache-dir $FACESTAGE_MODEL_DIR for each
#                                                     NAME (idempotent: a present, verified file
#                                                     is kept; downloads are renamed atomically);
#                                                     FACESTAGE_ALLOW_UNPINNED_MODELS=1 adds
#                                                     --allow-unpinned (models without a pinned
#                                                     sha256, e.g. det_10g: size-checked only)
#   models ARGS... | facestage ARGS...             -> facestage ARGS... (the CLI as is)
#   healthcheck [FLAGS...]                         -> facestage-healthcheck (grpc.health.v1)
#   any other executable on PATH (sh, python, ...) -> run as is
#
# `exec` keeps the server as PID 1 so SIGTERM reaches it and it drains
# (FACESTAGE_<STAGE>_DRAIN_GRACE_S) before exiting.
set -eu

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
}

if [ "$#" -eq 0 ]; then
  usage
  exit 64
fi

role="$1"
shift
case "$role" in
  detector|embedder|swapper|enhancer)
    exec "facestage-$role" "$@"
    ;;
  orchestrator|serve)
    exec facestage serve "$@"
    ;;
  pull-models)
    if [ "$#" -eq 0 ]; then
      echo "pull-models: name at least one model (det_10g w600k_r50 inswapper_128 gfpgan_1.4)" >&2
      exit 64
    fi
    cache_dir="${FACESTAGE_MODEL_DIR:-/models}"
    unpinned=""
    if [ "${FACESTAGE_ALLOW_UNPINNED_MODELS:-0}" = "1" ]; then
      unpinned="--allow-unpinned"
    fi
    for name in "$@"; do
      echo "pulling $name into $cache_dir" >&2
      # shellcheck disable=SC2086  # $unpinned is one flag or nothing
      facestage models pull --no-progress $unpinned "$name" --cache-dir "$cache_dir"
    done
    ;;
  models)
    exec facestage models "$@"
    ;;
  facestage)
    exec facestage "$@"
    ;;
  healthcheck)
    exec facestage-healthcheck "$@"
    ;;
  -h|--help|help)
    usage
    ;;
  *)
    if command -v "$role" >/dev/null 2>&1; then
      exec "$role" "$@"
    fi
    echo "facestage entrypoint: unknown role '$role'" >&2
    usage
    exit 64
    ;;
esac
