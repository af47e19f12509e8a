#!/bin/sh
# The recipe of examples/deb: build the Debian package in hello-cloudbuild/ with dpkg-buildpackage
# (binary only, unsigned); the .deb files are the build's results.
set -e
cd hello-cloudbuild
dpkg-buildpackage -us -uc -b
cd ..
cp ./*.deb "$BUILD_RESULTS/"
ls -l "$BUILD_RESULTS"
