#!/usr/bin/env bash
# arm64 proof harness: run edgesqz's device install in a Debian bookworm arm64 userland (Python 3.11,
# what 64-bit Raspberry Pi OS bookworm is built on) under qemu user-mode emulation.
#
#   scripts/arm64.sh setup                        host packages, binfmt, rootfs (built once, reused),
#                                                 venv with `pip install /src` (aarch64 wheels, no TF/torch)
#   scripts/arm64.sh run [--bind DIR[:GUEST]]... -- CMD [ARG...]
#                                                 run CMD in the emulated userland (venv first on PATH);
#                                                 --bind makes a host folder visible (same path by default)
#   scripts/arm64.sh check MODEL.tflite IMAGES_DIR [OUT_DIR [EXTRA.tflite ...]]
#                                                 preprocess IMAGES_DIR on this host, run the model and the
#                                                 CLI (info, classify, run, bench, doctor, edgetpu check,
#                                                 each when it exists) here and
#                                                 under arm64 on the same pixels, compare; exit 1 on mismatch
#                                                 (integer outputs bit-identical, float within 1e-5, same
#                                                 top-1); EXTRA models: raw outputs only
#   scripts/arm64.sh resolve [PYVER]              does the device dependency set resolve for PYVER (3.13)
#                                                 aarch64 (Raspberry Pi OS trixie)? host-side pip, no install
#   scripts/arm64.sh clean                        unmount and delete the rootfs
#
# Environment:
#   EDGESQZ_ARM64_ROOT     rootfs, outside the repository [/var/cache/edgesqz/arm64-bookworm]
#   EDGESQZ_ARM64_CPU      cortex-a72 (Pi 4) or cortex-a76 (Pi 5) [cortex-a72]
#   EDGESQZ_ARM64_MIRROR   Debian mirror [the first Debian mirror in the host's apt sources]
#   EDGESQZ_HOST_PYTHON    host Python with edgesqz installed, for check/resolve [first that imports edgesqz]
#   EDGESQZ_ARM64_FRESH=1  recreate the guest venv and run the full `pip install /src` there (done anyway on
#                          the first setup and whenever pyproject.toml changes; otherwise only edgesqz itself
#                          is reinstalled when the sources change, from a wheel built on the host)
#
# Two traps of qemu 7.2 are handled here (see shared/docs/pi-emulation.md): the guest sees the host's
# x86 /proc/cpuinfo (LiteRT segfaults) -> an aarch64 cpuinfo is bind-mounted over it; qemu's default
# CPU model advertises SVE/SME and LiteRT's int8 kernels then return wrong results -> QEMU_CPU is set
# to a real Pi core for every guest process (arm64_check.py verifies the guest sees no SVE).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${EDGESQZ_ARM64_ROOT:-/var/cache/edgesqz/arm64-bookworm}
ROOT=${ROOT%/}
CPU=${EDGESQZ_ARM64_CPU:-cortex-a72}
SUITE=bookworm
VENV=/opt/edgesqz-venv
STATE=/opt/edgesqz                     # inside the rootfs: markers, fake cpuinfo
INCLUDE=base-files,base-passwd,bash,coreutils,libstdc++6,libgcc-s1,python3,python3-venv,python3-pip,ca-certificates
ROOTFS_RECIPE="v1 $SUITE extract $INCLUDE"
HOST_PACKAGES=(qemu-user-static binfmt-support mmdebstrap rsync)
START=$SECONDS
MOUNTED=0

log() { printf 'arm64 [%3ds]: %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'arm64: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "$CPU" in
    cortex-a72) CPU_PART=0xd08 ;;
    cortex-a76) CPU_PART=0xd0b ;;
    *) die "EDGESQZ_ARM64_CPU must be cortex-a72 (Pi 4) or cortex-a76 (Pi 5), not '$CPU'" ;;
esac
case "$ROOT" in
    /|/var|/var/cache|/tmp|/home|/root|/usr|"") die "refusing to use '$ROOT' as the rootfs" ;;
esac
case "$ROOT/" in
    "$REPO"/*) die "EDGESQZ_ARM64_ROOT must be outside the repository ($REPO)" ;;
esac

need_root() { [ "$(id -u)" = 0 ] || die "needs root (apt-get, binfmt_misc, mount, chroot)"; }

# ---------------------------------------------------------------- host side

host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "host packages present (${HOST_PACKAGES[*]})"
        return
    fi
    log "installing host packages: ${missing[*]} (apt-get update first)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >/dev/null
    log "host packages installed"
}

enable_binfmt() {
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
    fi
    if ! grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
        update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
    fi
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt handler qemu-aarch64 is not enabled"
    log "binfmt qemu-aarch64 enabled (flags: $(sed -n 's/^flags: //p' /proc/sys/fs/binfmt_misc/qemu-aarch64))"
}

# The first Debian archive URI in the host's apt sources (deb822 .sources files and one-line lists).
debian_mirror() {
    if [ -n "${EDGESQZ_ARM64_MIRROR:-}" ]; then
        echo "$EDGESQZ_ARM64_MIRROR"
        return
    fi
    local files=() f uri
    for f in /etc/apt/sources.list.d/*.sources; do [ -f "$f" ] && files+=("$f"); done
    if [ ${#files[@]} -gt 0 ]; then
        uri=$(awk '
            function flush() { if (!done && uris != "" && suites !~ /security/ && uris ~ /debian/ && uris !~ /security/) { split(uris, u, " "); print u[1]; done = 1; exit } uris = ""; suites = "" }
            /^[[:space:]]*$/ { flush(); next }
            tolower($1) == "uris:" { uris = $2; for (i = 3; i <= NF; i++) uris = uris " " $i }
            tolower($1) == "suites:" { suites = $0 }
            END { flush() }' "${files[@]}")
        [ -n "$uri" ] && { echo "$uri"; return; }
    fi
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|ftp|file):/) { if ($i ~ /debian/ && $i !~ /security/ && $(i+1) !~ /security/) { print $i; exit } break } }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    echo "http://deb.debian.org/debian"
}

# ---------------------------------------------------------------- mounts (always cleaned up)

mounts_under() {  # mount points below $1, deepest first
    awk -v root="$1" '{ gsub(/\\040/, " ", $2); if ($2 == root || index($2, root "/") == 1) print $2 }' /proc/self/mounts | sort -r
}

unmount_all() {
    local m
    while read -r m; do
        [ -n "$m" ] || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under "$ROOT")
    if [ -n "$(mounts_under "$ROOT")" ]; then
        die "could not unmount everything below $ROOT: $(mounts_under "$ROOT" | tr '\n' ' ')"
    fi
}

cleanup() {
    local rc=$?
    if [ "$MOUNTED" = 1 ]; then
        unmount_all || true
        MOUNTED=0
    fi
    exit "$rc"
}

fake_cpuinfo() {  # an aarch64 /proc/cpuinfo: one entry per host core, a Pi 4's (or Pi 5's) core
    local n i
    n=$(nproc)
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 3\n\n' \
            "$CPU_PART"
    done
}

mount_guest() {
    MOUNTED=1
    mount -t proc proc "$ROOT/proc"
    mount --bind /sys "$ROOT/sys"
    mount --bind /dev "$ROOT/dev"
    mkdir -p "$ROOT$STATE"
    fake_cpuinfo >"$ROOT$STATE/cpuinfo"
    mount --bind "$ROOT$STATE/cpuinfo" "$ROOT/proc/cpuinfo"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
}

in_guest() {  # run a command in the guest with a clean environment, QEMU_CPU set for every process
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb CI="${CI:-}" \
        PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" QEMU_CPU="$CPU" PYTHONDONTWRITEBYTECODE=1 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off "$@" </dev/null
}

# ---------------------------------------------------------------- rootfs

rootfs_ok() {
    [ -f "$ROOT$STATE/rootfs.ok" ] && [ "$(cat "$ROOT$STATE/rootfs.ok")" = "$ROOTFS_RECIPE" ] &&
        in_guest /usr/bin/python3 -c 'import ensurepip, ssl, venv' >/dev/null 2>&1
}

build_rootfs() {
    local mirror tmp
    mirror=$(debian_mirror)
    tmp="$ROOT.tmp"
    MOUNTED=1  # a killed earlier build may have left mounts below $ROOT or $tmp
    ROOT="$tmp" unmount_all
    unmount_all
    if [ -e "$ROOT" ] || [ -e "$tmp" ]; then
        log "removing the old rootfs"
        rm -rf --one-file-system "$tmp" "$ROOT"
    fi
    mkdir -p "$(dirname "$ROOT")"
    log "building the $SUITE arm64 rootfs in $ROOT from $mirror (mmdebstrap --variant=extract)"
    mmdebstrap --mode=root --arch=arm64 --variant=extract --include="$INCLUDE" -q \
        "$SUITE" "$tmp" "$mirror" </dev/null || die "mmdebstrap failed"
    # extract runs no maintainer scripts: do what they would have done and what pip needs.
    cp "$tmp/usr/share/base-passwd/passwd.master" "$tmp/etc/passwd"
    cp "$tmp/usr/share/base-passwd/group.master" "$tmp/etc/group"
    ln -sf bash "$tmp/bin/sh"
    mkdir -p "$tmp/etc/ssl/certs" "$tmp$STATE" "$tmp/src" "$tmp/tmp" "$tmp/root"
    chmod 1777 "$tmp/tmp"
    cp /etc/ssl/certs/ca-certificates.crt "$tmp/etc/ssl/certs/ca-certificates.crt"
    cp -L /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
    echo "$ROOTFS_RECIPE" >"$tmp$STATE/rootfs.ok"
    mv "$tmp" "$ROOT"
    log "rootfs built ($(du -sh --one-file-system "$ROOT" | cut -f1))"
}

# ---------------------------------------------------------------- device venv

sync_source() {
    mkdir -p "$ROOT/src"
    rsync -a --delete --delete-excluded --exclude=.git --exclude='.venv*' --exclude='__pycache__' --filter=':- .gitignore' \
        "$REPO/" "$ROOT/src/"
    # what goes into the edgesqz wheel (scripts/ and tests/ are used from /src directly)
    (cd "$ROOT/src" && find pyproject.toml README.md edgesqz converters device -type f -print0 2>/dev/null |
        sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

pip_python() {  # a host Python 3.11+ with pip (tomllib, pip --report)
    local py
    for py in "${EDGESQZ_HOST_PYTHON:-}" python3; do
        if [ -n "$py" ] && "$py" -c 'import sys, tomllib; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 &&
           "$py" -m pip --version >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

host_wheel() {  # build edgesqz's pure-Python wheel on the host (seconds; 50 s under emulation) into $1
    local py tmp
    py=$(pip_python) || return 1
    tmp=$(mktemp -d)
    cp -a "$ROOT/src/." "$tmp/src"
    if ! "$py" -m pip wheel -q --no-deps -w "$1" "$tmp/src" </dev/null >/dev/null 2>&1; then
        rm -rf "$tmp"
        return 1
    fi
    rm -rf "$tmp"
    compgen -G "$1/edgesqz-*-py3-none-any.whl" >/dev/null
}

device_venv() {
    local deps_hash src_hash stamp_deps="$ROOT$STATE/venv.deps" stamp_src="$ROOT$STATE/venv.src" wheel_dir
    src_hash=$(sync_source)
    deps_hash=$(sha256sum "$ROOT/src/pyproject.toml" | cut -d' ' -f1)
    if [ "${EDGESQZ_ARM64_FRESH:-0}" = 1 ] || [ ! -x "$ROOT$VENV/bin/python" ] ||
       [ "$(cat "$stamp_deps" 2>/dev/null)" != "$deps_hash" ]; then
        log "creating $VENV in the guest and running 'pip install /src' there (aarch64 wheels from PyPI; 2-4 min)"
        rm -f "$stamp_deps" "$stamp_src"
        in_guest /usr/bin/python3 -m venv --clear "$VENV"
        in_guest "$VENV/bin/pip" --version
        in_guest "$VENV/bin/pip" install --progress-bar off /src || die "pip install /src failed in the guest"
        echo "$deps_hash" >"$stamp_deps"
        echo "$src_hash" >"$stamp_src"
    elif [ "$(cat "$stamp_src" 2>/dev/null)" != "$src_hash" ]; then
        # Dependencies unchanged: only edgesqz itself (pure Python, py3-none-any) is reinstalled. Its wheel is
        # built on the host when a host pip exists (the build is architecture-independent and 10x faster).
        wheel_dir="$ROOT/tmp/edgesqz-wheel"
        rm -rf "$wheel_dir"
        mkdir -p "$wheel_dir"
        if host_wheel "$wheel_dir"; then
            log "sources changed: reinstalling edgesqz from a wheel built on the host ($(basename "$wheel_dir"/edgesqz-*.whl))"
            in_guest sh -c "$VENV/bin/pip install -q --no-deps --force-reinstall /tmp/edgesqz-wheel/edgesqz-*.whl" ||
                die "installing the edgesqz wheel failed in the guest"
        else
            log "sources changed: reinstalling edgesqz with 'pip install /src' in the guest (about 1 min)"
            in_guest "$VENV/bin/pip" install -q --no-deps --force-reinstall /src || die "pip install /src failed"
        fi
        rm -rf "$wheel_dir"
        echo "$src_hash" >"$stamp_src"
    else
        log "device venv up to date ($VENV)"
    fi
    log "verifying the guest install"
    in_guest "$VENV/bin/python" /src/scripts/arm64_check.py verify-install --cpu "$CPU" ||
        die "the guest install is not what a Raspberry Pi would get (see above)"
}

setup() {
    need_root
    mkdir -p "$(dirname "$ROOT")"
    exec 9>"$ROOT.lock"
    if ! flock -n 9; then
        log "waiting for another arm64.sh using $ROOT"
        flock -w 3600 9 || die "timed out waiting for the lock on $ROOT"
    fi
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    MOUNTED=1
    unmount_all  # leftovers of a killed run
    MOUNTED=0
    host_packages
    enable_binfmt
    if [ -f "$ROOT$STATE/rootfs.ok" ]; then
        mount_guest
        if rootfs_ok; then
            log "reusing rootfs $ROOT"
        else
            log "rootfs $ROOT is broken or outdated: rebuilding"
            unmount_all
            MOUNTED=0
            build_rootfs
            mount_guest
        fi
    else
        build_rootfs
        mount_guest
    fi
    rootfs_ok || die "the rootfs does not work (python3 does not start under qemu)"
    device_venv
    log "ready: $VENV in $ROOT (QEMU_CPU=$CPU)"
}

# ---------------------------------------------------------------- commands

host_python() {
    local c
    for c in "${EDGESQZ_HOST_PYTHON:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$REPO/.venv/bin/python" \
             "$REPO/.venv-device/bin/python" python3; do
        [ -n "$c" ] || continue
        if "$c" -c 'import edgesqz.imaging, edgesqz.device.runtime' >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
    die "no host Python with edgesqz installed; set EDGESQZ_HOST_PYTHON (e.g. .venv/bin/python)"
}

cmd_run() {
    local binds=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --bind) [ $# -ge 2 ] || die "--bind needs a folder"; binds+=("$2"); shift 2 ;;
            --bind=*) binds+=("${1#--bind=}"); shift ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    [ $# -gt 0 ] || die "usage: scripts/arm64.sh run [--bind DIR[:GUEST]]... -- CMD [ARG...]"
    setup
    local b host guest
    for b in "${binds[@]}"; do
        host=${b%%:*}
        guest=${b#*:}
        [ "$b" = "$host" ] && guest=$host
        host=$(realpath "$host")
        [ -d "$host" ] || die "--bind: $host is not a folder"
        case "$guest" in /*) ;; *) die "--bind: the guest path must be absolute: $guest" ;; esac
        mkdir -p "$ROOT$guest"
        mount --bind "$host" "$ROOT$guest"
    done
    log "running in the guest: $*"
    local rc=0
    in_guest "$@" || rc=$?
    log "done (exit $rc)"
    return "$rc"
}

cmd_check() {
    if [ $# -lt 2 ]; then die "usage: scripts/arm64.sh check MODEL.tflite IMAGES_DIR [OUT_DIR [EXTRA_MODEL.tflite ...]]"; fi
    local model images out py work rc=0 extra="" i=0 m
    model=$(realpath "$1")
    images=$(realpath "$2")
    [ -f "$model" ] || die "no model $model"
    [ -e "$images" ] || die "no images at $images"
    out=${3:-$(mktemp -d /tmp/edgesqz-arm64-check.XXXXXX)}
    shift 2; [ $# -gt 0 ] && shift
    mkdir -p "$out"
    out=$(realpath "$out")
    py=$(host_python)
    # One folder with the same relative paths on both sides: model, images, inputs, a short video.
    work="$out/work"
    rm -rf "$work" "$out/host" "$out/arm64"
    mkdir -p "$work/images" "$out/host" "$out/arm64"
    cp "$model" "$work/model.tflite"
    for m in "$@"; do  # more models whose raw outputs are compared (no CLI run), e.g. an int8-output one
        [ -f "$m" ] || die "no model $m"
        cp "$m" "$work/extra$i.tflite"
        extra="$extra --extra-model extra$i.tflite"
        i=$((i + 1))
    done
    if [ -d "$images" ]; then cp -rL "$images/." "$work/images/"; else cp -L "$images" "$work/images/"; fi
    log "host ($py): preprocessing $(basename "$images") into inputs.npz"
    "$py" "$REPO/scripts/arm64_check.py" prepare --images "$work/images" --out "$work/inputs.npz" --video "$work/clip.avi"
    log "host: running the model and the CLI (x86_64)"
    # shellcheck disable=SC2086  # $extra is a list of options without spaces
    (cd "$work" && "$py" "$REPO/scripts/arm64_check.py" run --model model.tflite $extra --inputs inputs.npz \
        --images images --video clip.avi --out "$out/host")
    setup
    mkdir -p "$ROOT/mnt/edgesqz-check"
    mount --bind "$out" "$ROOT/mnt/edgesqz-check"
    log "guest: running the model and the CLI (aarch64, QEMU_CPU=$CPU)"
    local t0=$SECONDS
    in_guest /bin/sh -c "cd /mnt/edgesqz-check/work && exec python /src/scripts/arm64_check.py run \
        --model model.tflite $extra --inputs inputs.npz --images images --video clip.avi --out /mnt/edgesqz-check/arm64"
    log "guest run took $((SECONDS - t0)) s"
    "$py" "$REPO/scripts/arm64_check.py" compare "$out/host" "$out/arm64" --out "$out/summary.json" || rc=$?
    log "results in $out (summary.json, host/, arm64/)"
    return "$rc"
}

cmd_resolve() {
    local py
    py=$(pip_python) || die "no host Python 3.11+ with pip; set EDGESQZ_HOST_PYTHON"
    "$py" "$REPO/scripts/arm64_check.py" resolve --pyproject "$REPO/pyproject.toml" --python-version "${1:-3.13}"
}

cmd_clean() {
    need_root
    exec 9>"$ROOT.lock"
    flock -w 600 9 || die "another arm64.sh is using $ROOT"
    MOUNTED=1
    unmount_all
    ROOT="$ROOT.tmp" unmount_all
    MOUNTED=0
    rm -rf --one-file-system "$ROOT" "$ROOT.tmp"
    log "removed $ROOT"
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
        setup) setup ;;
        run) cmd_run "$@" ;;
        check) cmd_check "$@" ;;
        resolve) cmd_resolve "$@" ;;
        clean) cmd_clean ;;
        -h|--help|help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
