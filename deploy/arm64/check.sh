#!/usr/bin/env bash
# `make check-arm64`: the agent on a Debian arm64 userland under qemu-user, checking artifacts made on this x86 host.
#
#   1. a Debian arm64 root file system under build/arm64/rootfs (debootstrap, run through qemu-user-static and
#      binfmt_misc), built once from the mirror and suite this host's apt uses, and reused afterwards;
#   2. the signed artifacts made here with the controller's own code (deploy/arm64/make_artifacts.py);
#   3. inside the chroot: `pip install '.[agent]'` (onnxruntime's aarch64 wheel from PyPI, pinned to the version the
#      controller used), then deploy/arm64/check_artifacts.py on every artifact: the agent's signature and sha256
#      checks and its validate_model, as a device runs them; the same script natively here for comparison;
#   4. the result table on stdout and in docs/benchmarks.md (section `arm64`).
#
# Needs root (debootstrap, chroot, mounts). Installs debootstrap, qemu-user-static and binfmt-support with apt-get
# when missing. Every mount it makes is undone on exit, and a binfmt entry (or binfmt_misc itself) it had to
# enable is disabled again. Settings (environment): ARM64_MIRROR, ARM64_SUITE (default: the host's Debian
# archive), ARM64_CPU (the CPU qemu emulates; default cortex-a72, a Raspberry Pi 4's, which has no int8 dot
# product), ARM64_EPOCHS (digits training epochs, default 4), EDGEFLEET_PYTHON (the controller's Python, default
# .venv/bin/python).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD="$REPO/build/arm64"
ROOTFS="$BUILD/rootfs"
BUNDLE="$BUILD/bundle"
PYTHON=${EDGEFLEET_PYTHON:-$REPO/.venv/bin/python}
ARM64_CPU=${ARM64_CPU:-cortex-a72}
ARM64_EPOCHS=${ARM64_EPOCHS:-4}
BINFMT_DIR=/proc/sys/fs/binfmt_misc
BINFMT_ENTRY=$BINFMT_DIR/qemu-aarch64
INCLUDE=python3,python3-venv,ca-certificates
# Inside the chroot: the project's copy, the agent's venv, the artifacts.
GUEST=/opt/edgefleet

MOUNTED=()
ENABLED_BINFMT=0
MOUNTED_BINFMT=0

log() { printf '[check-arm64] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" 2>/dev/null || log "could not unmount ${MOUNTED[i]}"
  done
  if [ "$ENABLED_BINFMT" = 1 ] && [ -e "$BINFMT_ENTRY" ]; then echo -1 >"$BINFMT_ENTRY" || true; fi
  if [ "$MOUNTED_BINFMT" = 1 ]; then umount "$BINFMT_DIR" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Anything still mounted below $1 (debootstrap mounts proc/sys in its target, and may leave them on failure).
unmount_below() {
  local target
  target=$(realpath -m "$1")
  awk -v t="$target" '$2 == t || index($2, t "/") == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}

mount_in() { # mount_in TARGET ARGS...: mount, and remember it for cleanup
  local target=$1
  shift
  mount "$@" "$target"
  MOUNTED+=("$target")
}

need_tools() {
  local missing=()
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null 2>&1 || missing+=(binfmt-support)
  if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# qemu-user-static registers its interpreter with the F flag (the kernel holds it open), so the chroot needs no
# copy of qemu. In a container or without systemd, binfmt_misc may need mounting and the entry enabling.
enable_binfmt() {
  if ! mountpoint -q "$BINFMT_DIR"; then
    mount -t binfmt_misc binfmt_misc "$BINFMT_DIR" || die "cannot mount $BINFMT_DIR (a container without privileges?)"
    MOUNTED_BINFMT=1
  fi
  if [ ! -e "$BINFMT_ENTRY" ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    if [ ! -e "$BINFMT_ENTRY" ] && [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
      cat /usr/lib/binfmt.d/qemu-aarch64.conf >"$BINFMT_DIR/register"
    fi
    [ -e "$BINFMT_ENTRY" ] || die "cannot register qemu-aarch64 with binfmt_misc"
    ENABLED_BINFMT=1
  fi
  grep -q '^enabled' "$BINFMT_ENTRY" || { echo 1 >"$BINFMT_ENTRY"; ENABLED_BINFMT=1; }
}

# "MIRROR SUITE" of the host's Debian archive: deb822 (*.sources) first, then one-line sources.list entries.
host_debian_source() {
  local found=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    found=$(awk 'BEGIN { RS = ""; FS = "\n" }
      { uris = ""; suites = ""; types = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^#/) continue
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); uris = $i }
          if ($i ~ /^Suites:/) { sub(/^Suites:[ \t]*/, "", $i); suites = $i }
          if ($i ~ /^Types:/) { types = $i }
        }
        split(uris, u, /[ \t]+/); split(suites, s, /[ \t]+/)
        if (types ~ /deb( |$)/ && u[1] ~ /\/debian\/?$/ && s[1] !~ /-/) { print u[1], s[1]; exit }
      }' /etc/apt/sources.list.d/*.sources)
  fi
  if [ -z "$found" ]; then
    found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | sed -E 's/\[[^]]*\]//' \
      | awk '$1 == "deb" && $2 ~ /\/debian\/?$/ && $3 !~ /-/ { print $2, $3; exit }')
  fi
  [ -n "$found" ] || die "no Debian archive in /etc/apt/sources.list*; set ARM64_MIRROR and ARM64_SUITE"
  echo "$found"
}

build_rootfs() {
  if [ -x "$ROOTFS/usr/bin/python3" ] && [ -f "$ROOTFS/.edgefleet-rootfs" ]; then
    log "reusing the arm64 root file system in ${ROOTFS#"$REPO"/} ($(cat "$ROOTFS/.edgefleet-rootfs"))"
    return
  fi
  local source mirror suite partial="$ROOTFS.partial"
  source=$(host_debian_source)
  mirror=${ARM64_MIRROR:-${source% *}}
  suite=${ARM64_SUITE:-${source#* }}
  for dir in "$partial" "$ROOTFS"; do
    if [ -e "$dir" ]; then
      unmount_below "$dir"
      rm -rf --one-file-system "$dir"
    fi
  done
  mkdir -p "$BUILD"
  log "debootstrap: Debian $suite arm64 from $mirror into ${partial#"$REPO"/} (several minutes under emulation)"
  if ! debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" "$suite" "$partial" "$mirror" \
    >"$BUILD/debootstrap.log" 2>&1; then
    unmount_below "$partial"
    tail -n 20 "$BUILD/debootstrap.log" >&2
    die "debootstrap failed (log: ${BUILD#"$REPO"/}/debootstrap.log)"
  fi
  unmount_below "$partial"
  echo "Debian $suite arm64 from $mirror, built $(date -u +%Y-%m-%dT%H:%MZ)" >"$partial/.edgefleet-rootfs"
  mv "$partial" "$ROOTFS"
}

# The project as a fresh clone has it (tracked and untracked-but-not-ignored files), without .venv or build/.
copy_source() {
  local dest="$ROOTFS$GUEST/src"
  rm -rf --one-file-system "$dest"
  mkdir -p "$dest"
  if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    # Files deleted in the working tree but still tracked are skipped, as a fresh clone of it would lack them.
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
      | tar --null -cf - -T -) | tar -xf - -C "$dest"
  else
    tar -C "$REPO" --exclude=./.venv --exclude=./build --exclude=./.git -cf - . | tar -xf - -C "$dest"
  fi
}

# qemu 7.2 passes the host's /proc/cpuinfo through, and onnxruntime's cpuinfo library crashes (SIGSEGV on import)
# parsing an x86 one on aarch64: the chroot gets an ARM one for the emulated core, one entry per host CPU. The ISA
# features that onnxruntime's kernels choose by come from the auxiliary vector, which qemu fills for ARM64_CPU.
write_cpuinfo() {
  local part i
  case "$ARM64_CPU" in
    cortex-a53) part=0xd03 ;; cortex-a57) part=0xd07 ;; cortex-a76) part=0xd0b ;; neoverse-n1) part=0xd0c ;;
    *) part=0xd08 ;; # cortex-a72
  esac
  for ((i = 0; i < $(nproc); i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
    printf 'CPU part\t: %s\nCPU revision\t: 3\n\n' "$part"
  done >"$1"
}

guest() { # guest COMMAND: run a shell command in the chroot with a clean environment
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    QEMU_CPU="$ARM64_CPU" PIP_CERT="$GUEST/host-ca.crt" PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 PYTHONDONTWRITEBYTECODE=1 /bin/sh -ec "$1"
}

main() {
  [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts); run it as root"
  [ -x "$PYTHON" ] || die "no controller Python at $PYTHON (make venv)"
  local began=$SECONDS ort
  need_tools
  enable_binfmt
  build_rootfs
  [ "$(chroot "$ROOTFS" /usr/bin/uname -m)" = aarch64 ] || die "the chroot does not run as aarch64"

  log "x86 controller: training digits and signing the artifacts (deploy/arm64/make_artifacts.py)"
  "$PYTHON" "$REPO/deploy/arm64/make_artifacts.py" --out "$BUNDLE" --epochs "$ARM64_EPOCHS"
  ort=$("$PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)')

  mkdir -p "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/dev" "$ROOTFS$GUEST"
  mount_in "$ROOTFS/proc" -t proc proc
  mount_in "$ROOTFS/sys" -t sysfs sysfs
  mount_in "$ROOTFS/dev" --bind /dev
  write_cpuinfo "$BUILD/cpuinfo"
  mount_in "$ROOTFS/proc/cpuinfo" --bind "$BUILD/cpuinfo"
  cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  # pip trusts what this host trusts (a proxy's CA, say); on an ordinary host that is the usual bundle.
  cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS$GUEST/host-ca.crt" 2>/dev/null \
    || cp "$ROOTFS/etc/ssl/certs/ca-certificates.crt" "$ROOTFS$GUEST/host-ca.crt"
  copy_source
  rm -rf "$ROOTFS$GUEST/bundle"
  cp -r "$BUNDLE" "$ROOTFS$GUEST/bundle"

  # The versions the suite is green with (constraints.txt) where the checkout has them, else the controller's
  # onnxruntime: the device side then runs what the controller measured with.
  local pins="'onnxruntime==$ort'"
  [ -f "$REPO/constraints.txt" ] && pins="-c constraints.txt"
  log "arm64 ($ARM64_CPU under qemu): pip install '.[agent]' $pins"
  guest "test -x $GUEST/venv/bin/python || python3 -m venv $GUEST/venv
    cd $GUEST/src && $GUEST/venv/bin/pip install --quiet $pins '.[agent]'
    if $GUEST/venv/bin/python -c 'import torch' 2>/dev/null; then echo 'torch in an agent install' >&2; exit 1; fi"

  log "arm64: checking the artifacts with the agent's code (deploy/arm64/check_artifacts.py)"
  local status=0
  guest "cd / && $GUEST/venv/bin/python $GUEST/src/deploy/arm64/check_artifacts.py $GUEST/bundle \
    --out $GUEST/bundle/arm64.json" || status=$?
  cp "$ROOTFS$GUEST/bundle/arm64.json" "$BUNDLE/arm64.json" 2>/dev/null || die "the arm64 check wrote no results"
  log "arm64: timing the reference workload (edgefleet-agent speed-factor)"
  guest "$GUEST/venv/bin/edgefleet-agent speed-factor --threads 1 --rounds 2 --json" > "$BUNDLE/arm64-speed.json" \
    || status=$?
  log "x86: the same check natively, for comparison"
  "$PYTHON" "$REPO/deploy/arm64/check_artifacts.py" "$BUNDLE" --out "$BUNDLE/x86.json" || status=$?

  "$PYTHON" "$REPO/deploy/arm64/report.py" "$BUNDLE" --cpu "$ARM64_CPU" --write-doc \
    --qemu "$(qemu-aarch64-static --version 2>/dev/null | head -n 1 || echo qemu-aarch64)" \
    --rootfs "$(cut -d, -f1 "$ROOTFS/.edgefleet-rootfs")" || status=$?
  log "done in $((SECONDS - began)) s (exit $status)"
  return "$status"
}

main "$@"
