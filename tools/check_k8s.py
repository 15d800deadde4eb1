"""Checks deploy/k8s/*.yaml against the Kubernetes API's types, without a cluster: each
document is read into the official Python client's model of its kind (`V1Job`…), which
checks required fields and value types, and written back; any field the model does not
know (a misspelling, a wrong level) is missing from the result and reported.

    python tools/check_k8s.py [FILE…]      # needs PyYAML and kubernetes (PyPI)
"""
import glob
import json
import os
import sys

import yaml
from kubernetes.client import ApiClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dropped(original, back, path=""):
    """Paths of `original` absent from `back`."""
    out = []
    if isinstance(original, dict):
        for k, v in original.items():
            if not isinstance(back, dict) or k not in back:
                out.append(path + "." + k)
            else:
                out += dropped(v, back[k], path + "." + k)
    elif isinstance(original, list):
        for i, v in enumerate(original):
            out += dropped(v, back[i] if isinstance(back, list) and i < len(back) else None, "%s[%d]" % (path, i))
    return out


def main():
    files = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml")))
    client = ApiClient()
    bad = 0
    for f in files:
        for doc in yaml.safe_load_all(open(f)):
            kind = "V1" + doc["kind"]
            obj = client.deserialize(json.dumps(doc), kind, "application/json")
            back = client.sanitize_for_serialization(obj)
            lost = dropped(doc, back)
            name = "%s %s/%s" % (os.path.relpath(f, ROOT), doc["kind"], doc["metadata"]["name"])
            if lost:
                bad += 1
                print("%s: unknown fields %s" % (name, ", ".join(lost)))
            else:
                print("%s: valid %s" % (name, kind))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
