"""Checks the deployment files beyond their schemas (run by tests/deploy.rs
with the project's venv: PyYAML, kubernetes-validate, promql-parser).

  check_deploy.py kubernetes FILE...   schemas (strict) and the invariants:
      the region's node affinity, restricted pod security, egress only to
      DNS, the HSM and the database, probes on the admin listener, a PDB
  check_deploy.py monitoring METRICS   every alert and dashboard expression
      parses as PromQL and names only series of METRICS (a broker's /metrics)

Prints one line per problem and exits 1 if there is any.
"""

import json
import pathlib
import re
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
problems = []


def problem(msg):
    problems.append(msg)
    print("deploy check:", msg)


def kubernetes(files):
    venv_bin = pathlib.Path(sys.executable).parent
    r = subprocess.run(
        [str(venv_bin / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.31.0", *files],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        problem("schema: " + (r.stdout + r.stderr).strip())
    docs = [d for f in files for d in yaml.safe_load_all(open(f)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for ns in by_kind.get("Namespace", []):
        labels = ns["metadata"].get("labels", {})
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            problem(f"namespace {ns['metadata']['name']} does not enforce the restricted profile")
    workloads = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
    if not workloads:
        problem("no StatefulSet")
    for w in workloads:
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        terms = (
            spec.get("affinity", {})
            .get("nodeAffinity", {})
            .get("requiredDuringSchedulingIgnoredDuringExecution", {})
            .get("nodeSelectorTerms", [])
        )
        if not terms or not all(
            any(e["key"] == "topology.kubernetes.io/region" and e["operator"] == "In" for e in t.get("matchExpressions", []))
            for t in terms
        ):
            problem(f"{name}: no required node affinity on topology.kubernetes.io/region")
        pod_sc = spec.get("securityContext", {})
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problem(f"{name}: shares a host namespace")
        if spec.get("automountServiceAccountToken") is not False:
            problem(f"{name}: mounts a service account token")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            cname = f"{name}/{c['name']}"
            if sc.get("privileged"):
                problem(f"{cname}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                problem(f"{cname}: privilege escalation not disabled")
            if sc.get("readOnlyRootFilesystem") is not True:
                problem(f"{cname}: root filesystem writable")
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                problem(f"{cname}: may run as root")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
                problem(f"{cname}: capabilities not dropped")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problem(f"{cname}: seccomp is not RuntimeDefault")
            for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
                get = c.get(probe, {}).get("httpGet", {})
                if get.get("path") != path or get.get("port") != "admin":
                    problem(f"{cname}: {probe} is not {path} on the admin port")
        labels = w["spec"]["selector"]["matchLabels"]
        if not any(
            set(p["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
            for p in by_kind.get("PodDisruptionBudget", [])
        ):
            problem(f"{name}: no PodDisruptionBudget selects it")
    policies = by_kind.get("NetworkPolicy", [])
    if not policies:
        problem("no NetworkPolicy")
    for p in policies:
        spec = p["spec"]
        if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
            problem(f"networkpolicy {p['metadata']['name']}: must restrict both ingress and egress")
        for rule in spec.get("egress", []):
            ports = {(x.get("port"), x.get("protocol", "TCP")) for x in rule.get("ports", [])}
            if not rule.get("to") or not ports:
                problem("an egress rule allows every destination or every port")
                continue
            for peer in rule["to"]:
                block = peer.get("ipBlock")
                if block and block["cidr"].endswith("/0"):
                    problem(f"egress to {block['cidr']}: outside the region")
                if not block and not peer.get("namespaceSelector", {}).get("matchLabels"):
                    problem("egress to pods of any namespace")
            dns = ports <= {(53, "UDP"), (53, "TCP")}
            if not dns and not ports <= {(5432, "TCP"), (1792, "TCP")}:
                problem(f"egress ports {sorted(ports)} are neither DNS, the HSM nor the database")
        for rule in spec.get("ingress", []):
            if not rule.get("from"):
                problem("an ingress rule admits every source")


def exported(metrics_text):
    names = set()
    for line in metrics_text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if not m:
            continue
        name, kind = m.groups()
        names.add(name)
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def check_expr(where, expr, names):
    import promql_parser

    try:
        promql_parser.parse(expr)
    except Exception as e:  # the parser's own error type
        problem(f"{where}: not PromQL ({e}): {expr}")
        return
    used = set(re.findall(r"\bsovkms_[a-z_]+\b", expr))
    if not used:
        problem(f"{where}: names no sovkms series: {expr}")
    for n in sorted(used - names):
        problem(f"{where}: {n} is not a series the broker exports")


def monitoring(metrics_file):
    names = exported(open(metrics_file).read())
    if not names:
        problem(f"{metrics_file} holds no metric families")
    rules = yaml.safe_load(open(ROOT / "deploy/monitoring/alerts.yaml"))
    count = 0
    for g in rules["groups"]:
        for r in g["rules"]:
            for key in ("alert", "expr", "labels", "annotations"):
                if key not in r:
                    problem(f"rule {r.get('alert')}: no {key}")
            check_expr(f"alert {r.get('alert')}", r["expr"], names)
            count += 1
    dash = json.load(open(ROOT / "deploy/monitoring/grafana-dashboard.json"))
    for p in dash["panels"]:
        for t in p.get("targets", []):
            check_expr(f"panel {p['title']!r}", t["expr"], names)
            count += 1
    print(f"deploy check: {count} expressions parsed against {len(names)} exported series names")


def main():
    what, args = sys.argv[1], sys.argv[2:]
    if what == "kubernetes":
        kubernetes(args)
    elif what == "monitoring":
        monitoring(args[0])
    else:
        problem(f"unknown check {what}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
