#!/usr/bin/env bash
# Sets up a fresh machine: Debian's prometheus (Prometheus and promtool, for the tests and the monitoring
# configuration), chromium (the web app's browser tests), orthanc, orthanc-dicomweb and dicom3tools (the PACS
# tests), nginx and curl (the balancer tests) packages; a Python 3.11 virtual environment
# in .venv with the project and every extra installed in editable mode; the manifest linters in .tools.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)   # the web app's browser tests
# The PACS tests: a real Orthanc with its DICOMweb plugin, and dciodvfy (dicom3tools) to validate results.
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
# The balancer tests: Debian's nginx in front of two replicas, and curl as a client that cannot balance.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "Installing Debian packages: ${missing[*]} ..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version}"'

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -c 'import numpy; assert numpy.__version__.startswith("1."), numpy.__version__'

# Manifest linters in their own environment (checkov pins many packages of its own).
[ -x .tools/bin/python ] || "$PYTHON" -m venv .tools
.tools/bin/python -m pip install --quiet --upgrade pip
.tools/bin/python -m pip install --quiet "checkov==3.3.30" "kubernetes-validate==1.37.0"
# Triton's perf_analyzer (braintumor bench): the binary of the server's release, from the tritonclient 2.51 wheel,
# into .tools/perf_analyzer (PyPI's perf-analyzer wheels need glibc 2.38); see braintumor_serving/perf_analyzer.py.
[ -x .tools/perf_analyzer/bin/perf_analyzer ] || .venv/bin/python -m braintumor_serving.perf_analyzer install
echo "Set up: activate with 'source .venv/bin/activate' (or call .venv/bin/braintumor)."
