#!/usr/bin/env python3
"""Reads bench/stamps.c dumps: per event-loop turn that reads one message
and sends it on (epoll_wait returns, recv, send, epoll_wait again), the
median microseconds from the wake-up to the recv call and from recv's
return to the send call. Usage: stamps.py TSC_MHZ DUMP..."""
import statistics
import sys

WAIT_IN, WAIT_OUT, RECV_IN, RECV_OUT, SEND_IN, SEND_OUT = range(20, 26)
mhz = float(sys.argv[1])
for path in sys.argv[2:]:
    events = [tuple(map(int, line.split())) for line in open(path)]
    events = events[len(events) // 5:]  # leave out the warm-up
    turns, turn = [], None
    for event, tsc in events:
        if event == WAIT_OUT:
            turn = [(event, tsc)]
        elif turn is not None:
            turn.append((event, tsc))
            if event == WAIT_IN:
                turns.append(turn)
                turn = None
    shape = [WAIT_OUT, RECV_IN, RECV_OUT, SEND_IN, SEND_OUT, WAIT_IN]
    hops = [t for t in turns if [e for e, _ in t] == shape]
    if not hops:
        print(f"{path}: no one-message turns")
        continue

    def median(a, b):
        return statistics.median((t[b][1] - t[a][1]) / mhz for t in hops)

    print(
        f"{path}: {len(hops)} of {len(turns)} turns; median µs: "
        f"wake -> recv {median(0, 1):.2f}, recv -> send {median(2, 3):.2f}, "
        f"send -> wait {median(4, 5):.2f} (recv {median(1, 2):.2f}, send {median(3, 4):.2f})"
    )
