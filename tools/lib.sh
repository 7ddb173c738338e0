#!/usr/bin/env bash
# Shared helpers for tools/up, tools/test and .ci/run. Source it; it does nothing by itself.
#
#   ensure_deps [build|all]   install missing Debian packages, check cargo (and cargo-nextest)
#   setup_target_dir          pick CARGO_TARGET_DIR (a shared cache when CI=true)
#   target_dir                print the cargo target dir in use
set -euo pipefail

# Needed to compile the workspace (RocksDB is built from source with bindgen).
STORE_BUILD_DEPS=(libclang-dev pkg-config build-essential)
# Needed by the tests (qemu-img, NBD client tools and bindings, fio, ip/tc).
STORE_TEST_DEPS=(qemu-utils libnbd-bin python3-libnbd fio iproute2)

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Runs a command as root: directly when root, else through sudo when it exists.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*': run as root or install sudo"
    fi
}

# Installs the given Debian packages that are not installed yet. Runs `apt-get update`
# at most once per process, and only when something is missing.
install_missing_packages() {
    local missing=() pkg
    command -v dpkg >/dev/null 2>&1 ||
        die "dpkg not found: this script expects Debian; install these yourself: $*"
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get"
    log "installing missing Debian packages: ${missing[*]}"
    if [ -z "${STORE_APT_UPDATED:-}" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        STORE_APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_deps [build|all]: `build` checks what compiling needs; `all` (the default) also
# what the tests need, including cargo-nextest.
ensure_deps() {
    local what="${1:-all}"
    case "$what" in
        build) install_missing_packages "${STORE_BUILD_DEPS[@]}" ;;
        all) install_missing_packages "${STORE_BUILD_DEPS[@]}" "${STORE_TEST_DEPS[@]}" ;;
        *) die "ensure_deps: unknown argument '$what' (expected build or all)" ;;
    esac

    # rustup installs into ~/.cargo/bin, which a fresh shell may not have on PATH yet.
    if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
        export PATH
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust with rustup first (https://rustup.rs), then open a new shell"

    if [ "$what" = all ] && ! cargo nextest --version >/dev/null 2>&1; then
        log "installing cargo-nextest"
        cargo install cargo-nextest --locked
    fi
}

# Uses a target dir outside the checkout on CI, so clean clones reuse earlier builds.
# Leaves cargo's default (./target) otherwise, and never overrides an explicit CARGO_TARGET_DIR.
setup_target_dir() {
    if [ -z "${CARGO_TARGET_DIR:-}" ] && [ "${CI:-}" = true ]; then
        CARGO_TARGET_DIR="${STORE_TARGET_CACHE:-$HOME/.cache/store-target}"
        mkdir -p "$CARGO_TARGET_DIR"
    fi
    if [ -n "${CARGO_TARGET_DIR:-}" ]; then
        export CARGO_TARGET_DIR
        log "cargo target dir: $CARGO_TARGET_DIR"
    fi
}

# The cargo target dir in use (relative paths are relative to the repository root).
target_dir() {
    printf '%s\n' "${CARGO_TARGET_DIR:-target}"
}
