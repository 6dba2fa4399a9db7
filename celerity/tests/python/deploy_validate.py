"""Validates deploy/kubernetes and deploy/compose offline, for celerity/tests/deploy.rs.

Run with the python of scripts/deploy-venv.sh:  python deploy_validate.py <repo>/deploy

- Kubernetes: every core resource against the Kubernetes 1.37 JSON schemas shipped in the PyPI
  package kubernetes-validate, in strict mode (unknown fields are errors); KEDA's resources (not in
  the core schemas) against the pydantic models the PyPI package cloudcoil-models-keda generated
  from KEDA 2.16's CRDs (types and required fields; unknown fields found by what the model drops);
  then what the files promise each other: probes on the
  metrics port, a grace period longer than preStop + --grace, two beat replicas, a schedule from
  the ConfigMap, PodDisruptionBudgets and a ScaledObject that select/target the Deployments.
- Compose: against the compose-spec JSON schema vendored in the PyPI package check-jsonschema, then
  the services, healthchecks, stop grace periods and build paths.
- Negative controls: a copy with one misspelt field must fail each schema check, which shows the
  schema checks do reject what they should.

Prints one line per check and "deploy-validate: ok" last; exits 1 with the reasons otherwise. With
a second argument OUT, also writes to OUT (JSON) every command line the files give the celerity
binary ("commands") and the beat schedule the ConfigMap holds ("schedules"), for the Rust test to
check with the binary itself.
"""

import copy
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import pydantic
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from cloudcoil.models.keda import v1alpha1 as keda

K8S_VERSION = "1.37.0"
WORKER_PORT = 9808
BEAT_PORT = 9809

failures = []
found = {"commands": {}, "schedules": {}}


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_schema_errors(doc):
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        return "%s at %s" % (e.message, "/".join(str(p) for p in e.path))


def dropped(given, kept, path=""):
    """Keys of `given` that are not in `kept` (the model's dump): fields the model does not know."""
    out = []
    if isinstance(given, dict):
        for k, v in given.items():
            if not isinstance(kept, dict) or k not in kept:
                out.append(path + "/" + k)
            else:
                out += dropped(v, kept[k], path + "/" + k)
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            out += dropped(a, b, "%s/%d" % (path, i))
    return out


def keda_errors(doc):
    model = getattr(keda, doc.get("kind", ""), None)
    if model is None:
        return "no KEDA model for kind %r" % doc.get("kind")
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as e:
        return str(e).replace("\n", " ")
    unknown = dropped(doc, parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"))
    return "unknown fields %s" % unknown if unknown else None


def flag(args, name):
    """The value after `name` in an argument list, or None."""
    for i, a in enumerate(args[:-1]):
        if a == name:
            return args[i + 1]
    return None


def container(deploy):
    return deploy["spec"]["template"]["spec"]["containers"][0]


def probes_on(deploy, port, what):
    c = container(deploy)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        target = ports.get(get.get("port"), get.get("port"))
        check(get.get("path") == path and target == port,
              "%s: %s is GET %s on port %d" % (what, probe, path, port))
    check(flag(c["args"], "--metrics-addr") == "0.0.0.0:%d" % port,
          "%s: --metrics-addr 0.0.0.0:%d" % (what, port))


def selects(selector, deploy):
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    want = selector.get("matchLabels", {})
    return bool(want) and all(labels.get(k) == v for k, v in want.items())


def check_kubernetes(kdir):
    docs = {}
    for name in sorted(os.listdir(kdir)):
        if not name.endswith(".yaml"):
            continue
        for doc in load_all(os.path.join(kdir, name)):
            key = (doc["kind"], doc["metadata"]["name"])
            docs[key] = doc
            if doc["apiVersion"].startswith("keda.sh/"):
                err = keda_errors(doc)
                check(err is None, "%s %s/%s: KEDA 2.16 CRD models%s" % (
                    name, doc["kind"], key[1], "" if err is None else ": " + err))
                continue
            err = k8s_schema_errors(doc)
            check(err is None, "%s %s/%s: Kubernetes %s schema (strict)%s" % (
                name, doc["kind"], key[1], K8S_VERSION, "" if err is None else ": " + err))

    worker = docs.get(("Deployment", "celerity-worker"))
    beat = docs.get(("Deployment", "celerity-beat"))
    check(worker is not None and beat is not None, "worker and beat Deployments exist")
    if worker is None or beat is None:
        return

    # Negative controls: a misspelt field fails the strict schema and the KEDA check; a number
    # where KEDA wants a string fails the KEDA check.
    broken = copy.deepcopy(worker)
    container(broken)["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    check(k8s_schema_errors(broken) is not None, "control: a misspelt probe field is rejected")
    so = docs.get(("ScaledObject", "celerity-worker"))
    if so is not None:
        broken = copy.deepcopy(so)
        broken["spec"]["minReplicaCountt"] = 1
        check(keda_errors(broken) is not None, "control: a misspelt ScaledObject field is rejected")
        broken = copy.deepcopy(so)
        broken["spec"]["triggers"][0]["metadata"]["listLength"] = 100
        check(keda_errors(broken) is not None, "control: a non-string trigger value is rejected")

    for name, d in (("worker", worker), ("beat", beat)):
        found["commands"]["kubernetes " + name] = container(d)["args"]
    probes_on(worker, WORKER_PORT, "worker")
    probes_on(beat, BEAT_PORT, "beat")

    wspec = worker["spec"]["template"]["spec"]
    grace = float(flag(container(worker)["args"], "--grace") or 30)
    pre_stop = container(worker).get("lifecycle", {}).get("preStop", {})
    pause = pre_stop.get("sleep", {}).get("seconds", 0)
    check(bool(pre_stop), "worker: has a preStop hook")
    period = wspec.get("terminationGracePeriodSeconds", 30)
    check(period > pause + grace,
          "worker: terminationGracePeriodSeconds %s > preStop %s s + --grace %s s" % (
              period, pause, grace))

    check(beat["spec"].get("replicas") == 2, "beat: replicas 2 (the lease makes one active)")
    bc = container(beat)
    schedule = flag(bc["args"], "--schedule") or ""
    mounts = {m["name"]: m["mountPath"] for m in bc.get("volumeMounts", [])}
    volumes = beat["spec"]["template"]["spec"].get("volumes", [])
    from_cm = [v for v in volumes if "configMap" in v]
    ok = False
    for v in from_cm:
        cm = docs.get(("ConfigMap", v["configMap"]["name"]))
        mount = mounts.get(v["name"])
        if cm is not None and mount is not None and schedule.startswith(mount.rstrip("/") + "/"):
            key = schedule[len(mount.rstrip("/")) + 1:]
            ok = key in cm.get("data", {}) and "[[entry]]" in cm["data"][key]
            if ok:
                found["schedules"]["kubernetes ConfigMap " + cm["metadata"]["name"]] = cm["data"][key]
    check(ok, "beat: --schedule %s is a file of a mounted ConfigMap" % schedule)

    for name, target in (("celerity-worker", worker), ("celerity-beat", beat)):
        pdb = docs.get(("PodDisruptionBudget", name))
        check(pdb is not None and selects(pdb["spec"]["selector"], target),
              "PodDisruptionBudget %s selects its Deployment's pods" % name)
        check(selects(target["spec"]["selector"], target),
              "Deployment %s selector matches its template" % name)

    check_keda(docs)


def check_keda(docs):
    so = docs.get(("ScaledObject", "celerity-worker"))
    check(so is not None and so["apiVersion"] == "keda.sh/v1alpha1",
          "KEDA ScaledObject keda.sh/v1alpha1 exists")
    if so is None:
        return
    spec = so["spec"]
    check(spec.get("scaleTargetRef", {}).get("name") == "celerity-worker"
          and ("Deployment", "celerity-worker") in docs,
          "ScaledObject targets the worker Deployment")
    check(1 <= spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 0),
          "ScaledObject: 1 <= minReplicaCount <= maxReplicaCount")
    triggers = spec.get("triggers", [])
    check(len(triggers) > 0, "ScaledObject has triggers")
    known = {"redis": {"listName", "listLength"}, "rabbitmq": {"queueName", "mode", "value"}}
    for t in triggers:
        meta = t.get("metadata", {})
        needs = known.get(t.get("type"), None)
        check(needs is not None and needs <= set(meta),
              "trigger %s has %s" % (t.get("type"), sorted(needs or [])))
        # KEDA's CRD types trigger metadata as map[string]string.
        check(all(isinstance(v, str) for v in meta.values()),
              "trigger %s metadata values are strings" % t.get("type"))
        ref = t.get("authenticationRef", {}).get("name")
        if ref is not None:
            check(("TriggerAuthentication", ref) in docs,
                  "trigger %s authenticationRef %s exists" % (t.get("type"), ref))


def seconds(text):
    m = re.fullmatch(r"(\d+)s", str(text))
    return int(m.group(1)) if m else None


def check_compose(cdir):
    path = os.path.join(cdir, "compose.yaml")
    doc = load_all(path)[0]
    validator = jsonschema.Draft202012Validator(get_builtin_schema("vendor.compose-spec"))
    errors = ["%s at %s" % (e.message, "/".join(str(p) for p in e.path))
              for e in validator.iter_errors(doc)]
    check(not errors, "compose.yaml: compose-spec schema%s" % ("" if not errors else ": " + "; ".join(errors)))
    broken = copy.deepcopy(doc)
    broken["services"]["worker"]["stop_grace_periodd"] = "90s"
    check(any(True for _ in validator.iter_errors(broken)),
          "control: a misspelt service field is rejected")

    services = doc.get("services", {})
    check({"redis", "rabbitmq", "worker", "beat"} <= set(services),
          "compose: services redis, rabbitmq, worker, beat")
    for name, port, path_ in (("worker", WORKER_PORT, "/readyz"), ("beat", BEAT_PORT, "/healthz")):
        s = services.get(name, {})
        found["commands"]["compose " + name] = s.get("command", [])
        test = " ".join(s.get("healthcheck", {}).get("test", []))
        check("http://127.0.0.1:%d%s" % (port, path_) in test,
              "compose %s: healthcheck GET %s on %d" % (name, path_, port))
        check(flag(s.get("command", []), "--metrics-addr") == "0.0.0.0:%d" % port,
              "compose %s: --metrics-addr 0.0.0.0:%d" % (name, port))
        build = s.get("build", {})
        file_ = os.path.normpath(os.path.join(cdir, build.get("context", "."),
                                              build.get("dockerfile", "Dockerfile")))
        check(os.path.isfile(file_), "compose %s: builds from %s" % (name, os.path.relpath(file_, cdir)))
        deps = s.get("depends_on", {})
        check(all(deps.get(d, {}).get("condition") == "service_healthy" for d in ("redis", "rabbitmq")),
              "compose %s: waits for healthy redis and rabbitmq" % name)
        check(s.get("stop_signal") == "SIGTERM", "compose %s: stop_signal SIGTERM" % name)
    for name in ("redis", "rabbitmq"):
        check("test" in services.get(name, {}).get("healthcheck", {}), "compose %s: healthcheck" % name)
    worker = services.get("worker", {})
    grace = float(flag(worker.get("command", []), "--grace") or 30)
    stop = seconds(worker.get("stop_grace_period"))
    check(stop is not None and stop > grace,
          "compose worker: stop_grace_period %s > --grace %s s" % (stop, grace))
    for mount in services.get("beat", {}).get("volumes", []):
        src = mount.split(":")[0]
        if src.startswith("."):
            check(os.path.isfile(os.path.join(cdir, src)), "compose beat: mounts %s" % src)


def main():
    deploy = sys.argv[1]
    check_kubernetes(os.path.join(deploy, "kubernetes"))
    check_compose(os.path.join(deploy, "compose"))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            json.dump(found, f)
    if failures:
        print("deploy-validate: %d failed" % len(failures))
        sys.exit(1)
    print("deploy-validate: ok")


if __name__ == "__main__":
    main()
