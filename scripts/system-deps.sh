#!/usr/bin/env bash
# System tools some tests use: Orthanc with its Python plugin (tests/integration, the PACS
# round trip), dicom3tools' dciodvfy and DCMTK's dcmdump (DICOM validation of the
# Secondary Captures). Installed from Debian's packages only when missing, so reruns cost
# nothing; on a machine without apt (or without root and sudo) the tests that need them
# say why they are skipped.
set -euo pipefail
need=()
{ command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancPython.so ] || need+=(orthanc-python)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v dcmdump >/dev/null 2>&1 || need+=(dcmtk)
# tests/scaleout: the Ray cluster runs in a network namespace that has only loopback.
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ "${#need[@]}" -gt 0 ] || exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get; not installing ${need[*]}" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "system-deps: need root for ${need[*]}" >&2; exit 0; }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
