#!/bin/sh
# A package build with nothing but busybox: "compile" hello from its template, test it,
# pack hello-1.0.tar.gz and its checksum into $BUILD_RESULTS (which comes back into --dest).
# It runs inside the build machine, chrooted into the build root, in /.build-srcdir (a copy
# of this folder).
set -eu
name=hello
version=1.0
stage="/tmp/$name-$version"

echo "building $name $version on $(uname -m) with $BUILD_JOBS cpu(s), $(nproc) online"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/share/doc/$name"
sed -e "s/@VERSION@/$version/" hello.in > "$stage/bin/hello"
chmod 755 "$stage/bin/hello"
cp README "$stage/share/doc/$name/README"

# the test suite
out=$("$stage/bin/hello")
test "$out" = "Hello, world! (hello $version)" || { echo "unexpected output: $out"; exit 1; }
test "$("$stage/bin/hello" cloudbuild)" = "Hello, cloudbuild! (hello $version)"
echo "tests passed"

tar -C /tmp -czf "$BUILD_RESULTS/$name-$version.tar.gz" "$name-$version"
cd "$BUILD_RESULTS"
sha256sum "$name-$version.tar.gz" > SHA256SUMS
ls -l
