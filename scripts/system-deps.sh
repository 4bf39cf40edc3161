#!/usr/bin/env bash
# System tools some tests use: Orthanc with its Python plugin (tests/integration, the PACS
# round trip) and its DICOMweb plugin (tests/dimse, STOW-RS), dicom3tools' dciodvfy and
# DCMTK's dcmdump (DICOM validation of the Secondary Captures) and storescu (tests/dimse,
# the C-STORE sender), docker-compose (tests/deploy), Chromium (tests/web: the web demo in
# a real browser, driven by Playwright without downloading a browser of its own). Installed
# from Debian's packages only when missing, so reruns cost nothing; on a machine without
# apt (or without root and sudo) the tests that need them say what is missing.
# Not installed here: kubectl, which tests/deploy needs for `kubectl kustomize` with
# kustomize v5; Debian's kubernetes-client is 1.20 (kustomize v2), too old for the
# manifests, so the machine's own kubectl (the Google Cloud SDK's here) is used.
set -euo pipefail
need=()
{ command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancPython.so ] || need+=(orthanc-python)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
{ command -v dcmdump && command -v storescu; } >/dev/null 2>&1 || need+=(dcmtk)
# tests/dimse/test_tls.py: stunnel terminates TLS in front of Orthanc's DICOMweb (STOW-RS to
# an https URL), as a hospital's reverse proxy does; Debian's Orthanc crashes on its own
# HTTPS (libcivetweb jumps to a null OpenSSL function at the first request).
command -v stunnel4 >/dev/null 2>&1 || need+=(stunnel4)
# `docker compose config` when the compose plugin is there, else Debian's docker-compose
# (tests/deploy: the compose file resolves; neither needs a Docker engine).
{ docker compose version || command -v docker-compose; } >/dev/null 2>&1 || need+=(docker-compose)
[ -x /usr/bin/chromium ] || need+=(chromium)
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
