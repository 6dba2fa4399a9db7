#!/usr/bin/env bash
# Creates (once) a Python venv holding the offline validators for deploy/: kubernetes-validate (the
# Kubernetes JSON schemas ship inside it), check-jsonschema (its vendored compose-spec schema) and
# cloudcoil-models-keda (pydantic models generated from KEDA 2.16's CRDs), pinned with their whole
# dependency closure, for celerity/tests/deploy.rs.
#
#   scripts/deploy-venv.sh            # -> prints the venv's python path as the last line of stdout
#
# The venv lives at ${CELERITY_DEPLOY_VENV:-<repo>/target/deploy-venv}; it is rebuilt only when the
# marker inside it does not match the pinned list. Concurrent callers serialize on a flock.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CELERITY_DEPLOY_VENV:-$repo/target/deploy-venv}"
# shellcheck source=scripts/venv-lib.sh
source "$repo/scripts/venv-lib.sh"
make_pinned_venv "$venv" "celerity-deploy-venv v2" \
  'import kubernetes_validate, check_jsonschema, jsonschema, yaml; from importlib.metadata import version; assert version("kubernetes-validate") == "1.37.0"; assert version("check-jsonschema") == "0.39.0"; from cloudcoil.models.keda import v1alpha1' \
  "kubernetes-validate==1.37.0" "check-jsonschema==0.39.0" "cloudcoil-models-keda==2.16.1.0" \
  "cloudcoil==0.6.0" "pydantic==2.14.4" "pydantic_core==2.50.5" "annotated-types==0.8.0" \
  "typing-inspection==0.4.5" "httpx==0.29.0" "httpcore==1.0.9" "h11==0.16.0" "anyio==4.16.0" \
  "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0" "rpds-py==2026.9.1" \
  "attrs==26.1.0" "PyYAML==6.0.4" "packaging==26.4" "typing_extensions==4.16.0" \
  "importlib_resources==7.1.0" "click==8.5.1" "regress==2026.9.1" "requests==2.34.2" \
  "certifi==2026.10.19.post1" "charset-normalizer==3.5.3" "idna==3.21" "urllib3==2.8.0" \
  "ruamel.yaml==0.19.1"
