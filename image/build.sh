#!/usr/bin/env bash
# Build the DaemonSet's OCI image without a registry, a Dockerfile or docker (`make image`):
#
#   1. wheels: `pip wheel` of the project (its wheel carries the compiled shim, metaplugin/bin/
#      plexus, so `make shim` runs first) and of its dependencies, into a wheelhouse;
#   2. root filesystem: Debian bookworm from the Debian mirror by mmdebstrap (minbase plus what
#      plexusd needs at run time), a venv at /opt/plexus made by the rootfs's own python3, and the
#      wheels installed into it from the wheelhouse only (--no-index);
#   3. image: buildah from scratch, that rootfs as its one layer, the config (entrypoint plexusd,
#      PATH, OCI labels), committed to an OCI archive (`ctr images import` / `skopeo copy` take it).
#
# As root on Debian bookworm, with network to the Debian mirror and PyPI. Usage:
#   image/build.sh PYTHON ARCHIVE IMAGE_REF
# PYTHON: an interpreter with pip, the same minor version as bookworm's python3 (3.11) since the
# wheelhouse's binary wheels must fit the rootfs's interpreter; ARCHIVE: the OCI archive to write;
# IMAGE_REF: its name, e.g. ghcr.io/plexus-cni/plexus:0.1.0. Everything else is in a temp dir next
# to ARCHIVE, removed on exit; ARCHIVE appears only once complete.
set -euo pipefail
umask 022   # the controller runs as uid 65532: the venv must be world-readable

if [ $# -ne 3 ]; then
  echo "usage: $0 PYTHON ARCHIVE IMAGE_REF" >&2
  exit 2
fi
python=$1 archive=$2 ref=$3
src=$(cd "$(dirname "$0")/.." && pwd)
suite=bookworm
venv=/opt/plexus

# What plexusd needs at run time besides minbase (which has util-linux, so nsenter, and libc-bin,
# whose ldconfig ctypes.util.find_library reads): python3; libudev1 (pyudev: SR-IOV uevents);
# iptables (the reference plugins plexusd execs as delegates, portmap and bridge's ipMasq, run
# iptables); nftables (network policy is applied with nft in each pod's netns); ca-certificates.
packages=python3,libudev1,iptables,nftables,ca-certificates

if [ "$(id -u)" -ne 0 ]; then
  echo "$0 must run as root (mmdebstrap's root mode, buildah)" >&2
  exit 2
fi
for tool in mmdebstrap buildah; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed (make apt)" >&2; exit 2; }
done
if [ ! -x "$src/metaplugin/bin/plexus" ]; then
  echo "no compiled shim at metaplugin/bin/plexus: run \`make shim\` first" >&2
  exit 2
fi
# Bookworm's interpreter is 3.11: binary wheels built for another minor would not install.
if [ "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != 3.11 ]; then
  echo "$python is not Python 3.11 (bookworm's python3): its wheels would not fit the image" >&2
  exit 2
fi
pip_whl=$(ls /usr/share/python-wheels/pip-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$pip_whl" ]; then
  echo "no pip wheel in /usr/share/python-wheels (Debian package python3-pip-whl)" >&2
  exit 2
fi

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
revision=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo unknown)
# One timestamp for the files' mtimes, the image's creation date and its label: the last commit's.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$src" log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

mkdir -p "$(dirname "$archive")"
work=$(mktemp -d "$(dirname "$archive")/work.XXXXXX")
store=(--root "$work/storage" --runroot "$work/runroot" --storage-driver vfs)
container=""
cleanup() {
  if [ -n "$container" ]; then buildah "${store[@]}" rm "$container" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== wheels: the project (with its compiled shim) and its dependencies"
# From a copy holding only the sources, so setuptools' build/ and egg-info never reach the
# wheel with files the tree no longer has.
mkdir -p "$work/src" "$work/wheelhouse"
tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./bench/out \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
    -cf - . | tar -C "$work/src" -xf -
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$work/wheelhouse" "$work/src"
own_wheel=$(ls "$work/wheelhouse"/plexus_cni-"$version"-*.whl)
"$python" - "$own_wheel" <<'EOF'
import sys, zipfile
if "metaplugin/bin/plexus" not in zipfile.ZipFile(sys.argv[1]).namelist():
    sys.exit(f"{sys.argv[1]} does not carry metaplugin/bin/plexus (the compiled shim)")
EOF
cp "$pip_whl" "$work/wheelhouse/"

echo "== root filesystem: Debian $suite minbase + $packages, $venv"
# Merged /usr from the start (the merged-usr hook dir installs usr-is-merged): otherwise apt picks
# usrmerge, which brings perl (50 MB). Hooks run with /proc, /sys and /dev mounted in the chroot.
# pip runs from its own wheel (python pip.whl/pip), so the image carries no pip. No bytecode,
# documentation, man pages, locales or apt lists stay (copyright files do; mmdebstrap drops the
# lists). kubernetes/aio, the client's asyncio copy (41 MB), goes too: Plexus uses the
# synchronous client only (tests/e2e/test_image.py imports every adaptor from the image).
mmdebstrap --variant=minbase --include="$packages" --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook="copy-in $work/wheelhouse /tmp" \
  --customize-hook="chroot \"\$1\" python3 -m venv --without-pip $venv" \
  --customize-hook="chroot \"\$1\" $venv/bin/python /tmp/wheelhouse/$(basename "$pip_whl")/pip \
      install --quiet --disable-pip-version-check --no-index --no-cache-dir --no-compile \
      --find-links /tmp/wheelhouse plexus-cni==$version" \
  --customize-hook='rm -rf "$1"/tmp/wheelhouse "$1"/var/cache/apt/* "$1"/var/log/*' \
  --customize-hook='find "$1" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +' \
  --customize-hook="rm -rf \"\$1\"$venv/lib/python3.11/site-packages/kubernetes/aio" \
  "$suite" "$work/rootfs.tar"

echo "== image: $ref"
container=$(buildah "${store[@]}" from scratch)
buildah "${store[@]}" add --quiet "$container" "$work/rootfs.tar" /
buildah "${store[@]}" config \
  --entrypoint '["plexusd"]' \
  --cmd '["--config", "/etc/plexus/plexusd.yaml"]' \
  --env PATH=$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env PYTHONDONTWRITEBYTECODE=1 \
  --workingdir / \
  --label org.opencontainers.image.title=plexus \
  --label "org.opencontainers.image.description=Plexus CNI meta-plugin: plexusd, plexusctl, plexus-controller and the static shim" \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.created=$created" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.source=https://github.com/plexus-cni/plexus \
  --label "org.opencontainers.image.ref.name=$ref" \
  --label "org.opencontainers.image.base.name=debian:$suite" \
  "$container"
buildah "${store[@]}" commit --quiet --format oci --disable-compression=false --timestamp "$SOURCE_DATE_EPOCH" \
  "$container" "oci-archive:$work/image.tar:$ref" >/dev/null
mv -f "$work/image.tar" "$archive"
echo "== wrote $archive ($(du -h "$archive" | cut -f1)) as $ref"
