#!/usr/bin/env python3
"""benches/startup.py - time from starting `nbdcrypt serve` to accepting NBD connections.

Formats a volume with the local key provider, then N times (default 100): starts
`nbdcrypt serve VOL --kek-file K --socket S`, connects to S in a tight loop (every 0.2 ms) until
the connection succeeds and the 18-byte NBD greeting arrives, then SIGTERMs the daemon and
waits for it. Prints min / median / p90 / max of the start-to-greeting time, and the daemon's
own `startup_ms` (from entering `serve` to listening, read from its JSON log).

    benches/startup.py [--runs 100] [--bin target/release/nbdcrypt] [--sector-size 4096]
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "nbdcrypt"))
    ap.add_argument("--sector-size", default="4096")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        kek, vol, sock = (os.path.join(d, n) for n in ("k.kek", "v.img", "s.sock"))
        subprocess.run([a.bin, "genkey", kek], check=True, stdout=subprocess.DEVNULL)
        with open(vol, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run([a.bin, "format", vol, "--key", "local:" + kek, "--sector-size", a.sector_size],
                       check=True, stdout=subprocess.DEVNULL)
        wall, own = [], []
        for _ in range(a.runs):
            log = os.path.join(d, "serve.log")
            with open(log, "wb") as lf:
                t0 = time.perf_counter()
                p = subprocess.Popen([a.bin, "serve", vol, "--kek-file", kek, "--socket", sock,
                                      "--log-format", "json", "--log-level", "info"], stderr=lf)
                while True:
                    try:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.connect(sock)
                        got = b""
                        while len(got) < 18:
                            chunk = s.recv(18 - len(got))
                            if not chunk:
                                break
                            got += chunk
                        s.close()
                        if got[:8] == b"NBDMAGIC":
                            break
                    except OSError:
                        s.close()
                    if p.poll() is not None:
                        sys.exit("nbdcrypt exited: " + open(log).read())
                    time.sleep(0.0002)
                wall.append((time.perf_counter() - t0) * 1000)
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
            for line in open(log):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("message") == "ready" and "startup_ms" in ev:
                    own.append(float(ev["startup_ms"]))
        def summary(v):
            v = sorted(v)
            return "min %.1f  median %.1f  p90 %.1f  max %.1f ms" % (
                v[0], statistics.median(v), v[int(0.9 * (len(v) - 1))], v[-1])
        print("nbdcrypt serve -> NBD greeting on the Unix socket, %d runs: %s" % (len(wall), summary(wall)))
        if own:
            print("daemon's own startup_ms (serve entered -> listening), %d runs: %s" % (len(own), summary(own)))

if __name__ == "__main__":
    main()
