#!/usr/bin/python3
"""Turns the JSON figures of tests/long.sh (one file per test) into the README's table.

usage: reliability_table.py DIR
"""
import json
import os
import sys

d = sys.argv[1]


def load(name):
    p = os.path.join(d, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None


def mib(n):
    return f"{n / (1 << 20):,.0f} MiB"


rows = []
for mode in ("sigkill", "powercut", "powercut-flush-eio"):
    for ss in (4096, 512):
        r = load(f"crash-{mode}-{ss}")
        if not r:
            continue
        if mode == "sigkill":
            what = f"SIGKILL of the daemon, {ss}-byte sectors"
            faults = f"{r['sigkills']} SIGKILLs ({r['rounds_crashed_with_inflight']} with requests in flight)"
        else:
            disk = r["disk"]
            what = f"power cut{' + failing flushes' if 'eio' in mode else ''}, {ss}-byte sectors"
            faults = (f"{r['rounds']} power cuts (drop all {r['cuts_drop_all']}, keep all {r['cuts_keep_all']}, "
                      f"random {r['cuts_random']}; sectors dropped {disk['units_dropped']}, kept older "
                      f"{disk['units_kept_older']}, kept latest {disk['units_kept_latest']})")
            if disk["flush_eio"]:
                faults += f"; {disk['flush_eio']} failed flushes losing {disk['writes_lost_by_failed_flush']} writes"
        rows.append((what, r["rounds"], faults,
                     f"{r['requests']:,} requests, {r['writes_acked']:,} writes acked, {r['writes_settled']:,} "
                     f"durable ({mib(r['settled_bytes'])}); {mib(r['bytes_verified'])} read back",
                     r["data_lost"]))
for ss in (4096, 512):
    r = load(f"faults-injected-{ss}")
    if r:
        disk = r["disk"]
        rows.append((f"injected faults, {ss}-byte sectors", f"{r['requests']:,} requests",
                     f"{r['injected']} faults (read EIO {disk['read_eio']}, short read {disk['read_short']}, "
                     f"write EIO {disk['write_eio']}, short write {disk['write_short']}, ENOSPC "
                     f"{disk['write_enospc']}) = {r['errors']} client errors = {r['export_io_errors']} counted",
                     f"{mib(r['read_bytes_checked'])} of reads + {mib(r['final_bytes_checked'])} at the end",
                     0))
r = load("faults-enospc")
if r:
    rows.append(("ENOSPC: sparse file on a full tmpfs", "1", f"{r['enospc_errors']} ENOSPC",
                 f"{r['chunks_acked']} MiB acked, read back before and after a restart", 0))
r = load("faults-short-write")
if r:
    rows.append(("short write (RLIMIT_FSIZE)", "1", f"{r['errors']} EIO (EFBIG)", "writes below the limit", 0))
r = load("faults-short-read")
if r:
    rows.append(("short read (volume file truncated)", "1", f"{r['errors']} EIO", mib(r["bytes_verified"]), 0))
r = load("soak-4096")
if r:
    rows.append((f"soak, {r['clients']} clients reconnecting", f"{r['seconds']:.0f} s",
                 f"{r['clean_disconnects']} clean + {r['abrupt_disconnects']} abrupt disconnects",
                 f"{r['requests']:,} requests, {mib(r['read_bytes_checked'])} of reads checked, "
                 f"{mib(r['final_bytes_verified'])} at the end; RSS {r['rss_kib_after_warmup'] // 1024} MiB after "
                 f"warm-up, max {r['rss_kib_max'] // 1024} MiB; fds {r['fds_base']}->{r['fds_max']}->"
                 f"{r['fds_final']}; threads {r['tasks_base']}->{r['tasks_max']}->{r['tasks_final']}",
                 r["request_errors"]))
k = load("keys-hygiene")
if k:
    rows.append((f"key hygiene (volume, header backup, {k['log_sources']} outputs and logs at trace)", "1", "-",
                 f"{mib(k['bytes_searched'])} searched for every 16-byte window of the key and {k['keks']} KEKs", k["found"]))

run = load("run") or {}
print(f"Last long run: {run.get('date', '?')}, commit {run.get('commit', '?')}, "
      f"{run.get('seconds', 0) // 60} minutes, `tests/long.sh`.\n")
print("| scenario | rounds | faults injected | verified | data lost |")
print("|---|---|---|---|---|")
for what, rounds, faults, verified, lost in rows:
    print(f"| {what} | {rounds} | {faults} | {verified} | {lost} |")
