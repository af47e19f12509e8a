#!/bin/sh
# cloudbuild demo: a package build inside a freshly booted VM, no cloud account needed.
#
#   sudo examples/demo.sh            (Debian 12 / Ubuntu 22.04+, as root: it mounts disk images)
#
# 1. installs what it needs (scripts/setup): qemu, a kernel with modules, busybox-static, e2fsprogs,
#    and a virtualenv .venv with cloudbuild in it
# 2. makes a minimal build root (busybox) and builds examples/hello in a qemu VM (TCG: no KVM
#    needed; add KVM=1 to use --vm-type kvm where hardware virtualisation is available)
# 3. prints where the results, the build log and the statistics are
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
work=${DEMO_DIR:-/var/tmp/cloudbuild-demo}
venv=$here/.venv

if [ "$(id -u)" != 0 ]; then
    echo "run me as root (sudo $0): building mounts disk images" >&2
    exit 1
fi

echo "== installing what a local build needs (scripts/setup)"
"$here/scripts/setup"

rm -rf "$work"
mkdir -p "$work"
echo "== build root (busybox) in $work/rootfs"
"$venv/bin/cloudbuild" rootfs "$work/rootfs"

vm_type=qemu
[ "${KVM:-0}" = 1 ] && vm_type=kvm
echo "== building examples/hello in a $vm_type VM"
status=0
"$venv/bin/cloudbuild" build --vm-type "$vm_type" --rootfs "$work/rootfs" --dest "$work/out" \
    --vm-disk-size 1024 --vm-swap-size 256 --log-format console \
    "$here/examples/hello/build.sh" || status=$?

echo
if [ "$status" = 0 ]; then
    echo "== done: results in $work/out"
    ls -l "$work/out"
    (cd "$work/out" && sha256sum -c SHA256SUMS)
    echo "   build log:  $work/out.log"
    echo "   statistics: $work/out.statistics"
else
    echo "== the build failed with exit code $status (1: the recipe failed, 3: infrastructure, 4: host)"
    echo "   build log: $work/out.log"
fi
exit "$status"
