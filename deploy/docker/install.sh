#!/bin/sh
# Installs medexplain into the image's Python: its dependencies from pyproject.toml with the
# ONNX Runtime build of this image (onnxruntime for the CPU image, onnxruntime-gpu for the
# GPU image: both install the same module, so never both), the dicom extra (C-STORE SCP,
# STOW-RS), then the package itself without dependencies.
# Usage: install.sh ONNXRUNTIME_REQUIREMENT
set -eu
ort="$1"
python -c '
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [d for d in project["dependencies"] if not d.startswith("onnxruntime")]
print("\n".join(deps + project["optional-dependencies"]["dicom"]))
' > /tmp/requirements.txt
pip install --no-cache-dir -r /tmp/requirements.txt "$ort"
pip install --no-cache-dir --no-deps .
rm /tmp/requirements.txt
