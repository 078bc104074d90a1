#!/usr/bin/env bash
# Runs every osstream test on a fresh Debian machine: installs the packages the tests
# need (real NBD clients and peers), then runs formatting and lint checks, the Rust
# suites (unit, conformance, doc tests) and the end-to-end tests against real clients.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(libnbd-bin python3-libnbd python3-pytest qemu-utils fio nbdkit util-linux postgresql gcc nfs-ganesha nfs-ganesha-vfs rpcbind qemu-system-x86 ipxe-qemu ipxe busybox-static nbd-client cpio nasm e2fsprogs tftp-hpa curl ovmf debootstrap prometheus openssl systemd)
# Twice: installing one package can remove another that was there (a backported
# qemu-utils goes when Debian's qemu-system-x86 comes in); the second pass puts it back.
for pass in 1 2; do
  missing=()
  for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    [ "$pass" = 2 ] || $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
done

# s3rver (npm): the S3-compatible server the S3 backend's tests start on loopback.
if [ -z "${TEST_S3RVER:-}" ]; then
  tools="${XDG_CACHE_HOME:-$HOME/.cache}/osstream-test"
  if [ ! -x "$tools/node_modules/.bin/s3rver" ]; then
    if ! command -v npm >/dev/null 2>&1; then
      echo "== installing: nodejs npm"
      SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm
    fi
    echo "== installing: s3rver (npm) into $tools"
    mkdir -p "$tools"
    npm install --prefix "$tools" --no-audit --no-fund --loglevel=error s3rver@3.7.1
  fi
  export TEST_S3RVER="$tools/node_modules/.bin/s3rver"
fi

echo "== format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== Rust tests"
cargo build --workspace --locked
# The client agent as it ships (static, stripped, size-checked): the netboot tests put it
# into the machines' initramfs.
bash scripts/build-agent.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --lib --bins --tests
fi
cargo test --workspace --locked --doc

echo "== end-to-end tests with real clients"
df -h "${TMPDIR:-/tmp}" . | sed 's/^/   /'
# Debian's python3 sees python3-libnbd; a python3 earlier on PATH may not.
/usr/bin/python3 -m pytest -q tests/python
