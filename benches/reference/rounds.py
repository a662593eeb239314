#!/usr/bin/env python3
"""Issue 18's goals, round by round, from haproxy-chain.sh's rows (its ROUNDS=N).

Each line of the file is `name|c=1 p50|c=64 requests/s|relay CPU us|bulk MB/s`, as
haproxy-chain.sh's `run` writes them; a round is one row of haproxy's two HTTP+TLS hops
and one of Tower, in either order. Prints every goal's figure per round, its median, and
in how many rounds it was met.
"""
import statistics
import sys

HAPROXY = "haproxy HTTP+TLS (2 hops)"
TOWER = "tower (server + agent)"


def micros(latency):
    """wrk's latency (`208.00us`, `1.02ms`, `2.00s`) in microseconds."""
    for unit, scale in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if latency.endswith(unit):
            return float(latency[: -len(unit)]) * scale
    raise ValueError(f"not a wrk latency: {latency!r}")


def number(text):
    """A figure of the row, or None where the script printed `-`."""
    text = text.strip()
    return None if text in ("", "-") else float(text)


def rounds(lines):
    """Pairs (haproxy, tower) in the order the rows came, each a dict of figures."""
    pending = {}
    for line in lines:
        name, p50, rps, cpu, bulk = line.rstrip("\n").split("|")
        if name not in (HAPROXY, TOWER):
            continue
        pending[name] = {
            "p50": micros(p50),
            "rps": number(rps),
            "cpu": number(cpu),
            "bulk": number(bulk),
        }
        if len(pending) == 2:
            yield pending[HAPROXY], pending[TOWER]
            pending = {}


def main(path):
    with open(path) as rows:
        pairs = list(rounds(rows))
    if not pairs:
        sys.exit("rounds.py: no round has both rows")
    goals = [
        ("c=1 p50, Tower - haproxy (us; goal <= 0)",
         lambda h, t: t["p50"] - h["p50"], lambda v: v <= 0),
        ("c=64 requests/s, Tower / haproxy (goal >= 1.1)",
         lambda h, t: t["rps"] / h["rps"], lambda v: v >= 1.1),
        ("relay CPU per request, Tower (us; goal <= 35)",
         lambda h, t: t["cpu"], lambda v: v <= 35),
        ("relay CPU per request, Tower / haproxy",
         lambda h, t: t["cpu"] / h["cpu"], None),
        ("bulk HTTP/1.1, Tower / haproxy (goal >= 1.3)",
         lambda h, t: t["bulk"] / h["bulk"] if t["bulk"] and h["bulk"] else None,
         lambda v: v >= 1.3),
    ]
    print(f"\nIssue 18's goals over {len(pairs)} rounds:")
    for title, figure, met in goals:
        values = [figure(h, t) for h, t in pairs]
        shown = ", ".join("-" if v is None else f"{v:.2f}" for v in values)
        known = [v for v in values if v is not None]
        line = f"  {title}: {shown}"
        if known:
            line += f"; median {statistics.median(known):.2f}"
            if met is not None:
                line += f"; met in {sum(1 for v in known if met(v))} of {len(known)}"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
