"""Where two relay processes run while they move a download (bulk-placement.sh).

Usage: placement.py RELAY1_PID RELAY2_PID STAND_IN_PID. Prints "sampling" once it has
read every counter, then samples every 5 ms until SIGINT, and prints one line: each
process's CPU seconds, the machine's idle share, each relay's voluntary context switches,
and how often the two relays were on the same CPU (the "processor" field of
/proc/PID/stat: the CPU each last ran on), overall and among the samples where both were
runnable (state R), when one of them waits for the other.
"""

import os
import signal
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name: [0] is field 3 (state)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid):
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def voluntary_switches(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise RuntimeError(f"no voluntary_ctxt_switches for {pid}")


def idle_and_total():
    """The machine's idle and total jiffies (idle + iowait, all)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return values[3] + values[4], sum(values)


def counters(relays, stand_in):
    return (
        [cpu_seconds(p) for p in (*relays, stand_in)],
        [voluntary_switches(p) for p in relays],
        idle_and_total(),
    )


def main():
    relays = sys.argv[1:3]
    stand_in = sys.argv[3]
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    before = counters(relays, stand_in)
    print("sampling", flush=True)
    samples = same = both = both_same = 0
    while not stop:
        first, second = (stat_fields(p) for p in relays)
        on_one = first[36] == second[36]
        samples += 1
        same += on_one
        if first[0] == "R" and second[0] == "R":
            both += 1
            both_same += on_one
        time.sleep(0.005)
    after = counters(relays, stand_in)
    cpu = [a - b for a, b in zip(after[0], before[0])]
    slept = [a - b for a, b in zip(after[1], before[1])]
    idle = after[2][0] - before[2][0]
    total = after[2][1] - before[2][1]
    print(
        f"relays {cpu[0]:.2f} + {cpu[1]:.2f} s  stand-in {cpu[2]:.2f} s  "
        f"idle {100 * idle / max(total, 1):4.1f} %  slept {slept[0]} / {slept[1]}  "
        f"same CPU {100 * same / max(samples, 1):3.0f} % of {samples}, "
        f"both runnable {both}, of which on one CPU {both_same}"
    )


if __name__ == "__main__":
    main()
