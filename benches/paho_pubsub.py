#!/usr/bin/env python3
"""paho-mqtt as the load: one publisher and one subscriber through a front end, and the front
end's CPU time per delivered message (docs/benchmarks.md, "With the clients people use").

    python3 benches/paho_pubsub.py --target 127.200.0.1:1883 --pid "$(pidof nginx)" --qos 0 --messages 200000

The publisher sends --messages PUBLISHes of --size bytes as fast as paho takes them (QoS 1:
with --inflight in flight); the subscriber counts deliveries. CPU time is read from
/proc/PID/stat (utime + stime of the process and of every process whose parent it is, so
nginx's worker counts) when the first message arrives and when the last one does or the
deadline passes. Prints one JSON line.
"""

import argparse
import json
import os
import threading
import time

import paho.mqtt.client as mqtt

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of `pid` and its direct children, seconds."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="host:port of the front end (or broker)")
    ap.add_argument("--pid", type=int, help="front-end process whose CPU time to report")
    ap.add_argument("--broker-pid", type=int, help="broker process whose CPU time to report")
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=80)
    ap.add_argument("--qos", type=int, choices=[0, 1], default=0)
    ap.add_argument("--inflight", type=int, default=100, help="QoS 1 PUBLISHes in flight")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds to wait for every delivery")
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    topic = f"paho-bench/{os.getpid()}"
    got = 0
    first = threading.Event()
    done = threading.Event()
    marks = {}

    def on_message(_c, _u, _m):
        nonlocal got
        got += 1
        if got == 1:
            marks["start"] = (time.monotonic(), cpu_seconds(a.pid) if a.pid else 0.0,
                              cpu_seconds(a.broker_pid) if a.broker_pid else 0.0)
            first.set()
        marks["last"] = (time.monotonic(),)
        if got == a.messages:
            done.set()

    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-sub-{os.getpid()}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect(host, int(port), keepalive=60)
    sub.subscribe(topic, qos=a.qos)
    sub.loop_start()
    if not subscribed.wait(10):
        raise SystemExit(f"no SUBACK from {a.target} within 10 s")

    connected = threading.Event()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-pub-{os.getpid()}")
    pub.max_inflight_messages_set(a.inflight)
    pub.max_queued_messages_set(0)
    pub.on_connect = lambda *_: connected.set()
    pub.connect(host, int(port), keepalive=60)
    pub.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"no CONNACK from {a.target} within 10 s")
    payload = b"x" * a.size
    started = time.monotonic()
    for _ in range(a.messages):
        pub.publish(topic, payload, qos=a.qos)
    done.wait(a.deadline)
    end = (time.monotonic(), cpu_seconds(a.pid) if a.pid else 0.0,
           cpu_seconds(a.broker_pid) if a.broker_pid else 0.0)
    pub.loop_stop()
    sub.loop_stop()
    pub.disconnect()
    sub.disconnect()
    s = marks.get("start", end)
    # Messages counted from the first delivery on, when the CPU reading starts; the rate up to
    # the last delivery (a lost QoS 0 message would otherwise stretch it to the deadline).
    delivered = max(got - 1, 0)
    elapsed = marks.get("last", end)[0] - s[0]
    out = {
        "target": a.target,
        "qos": a.qos,
        "messages": a.messages,
        "delivered": got,
        "seconds": round(end[0] - started, 3),
        "msgs_per_sec": round(delivered / elapsed) if elapsed > 0 else None,
        "front_end_cpu_us_per_msg": round((end[1] - s[1]) * 1e6 / delivered, 2) if a.pid and delivered else None,
        "broker_cpu_us_per_msg": round((end[2] - s[2]) * 1e6 / delivered, 2) if a.broker_pid and delivered else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
