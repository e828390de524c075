"""Scrapes a Prometheus endpoint and parses it with the reference parser (prometheus_client),
printing the samples as JSON: {"scrape_seconds": s, "samples": [{family, type, name, labels,
value}]}. A format error makes the parser raise, and this script exit non-zero.

    /usr/bin/python3 tests/py/scrape.py http://127.0.0.1:9810/metrics
"""
import json
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

url = sys.argv[1]
start = time.perf_counter()
with urllib.request.urlopen(url, timeout=10) as r:
    body = r.read().decode()
    content_type = r.headers.get("Content-Type")
elapsed = time.perf_counter() - start
samples = []
for fam in text_string_to_metric_families(body):
    for s in fam.samples:
        samples.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps({"scrape_seconds": elapsed, "content_type": content_type, "bytes": len(body), "samples": samples}))
