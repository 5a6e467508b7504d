"""A paho-mqtt client over WebSockets (transport="websockets", path /mqtt).

sub: subscribes once (QoS 1) on its first connection and never again; prints one JSON line per
     CONNACK, SUBACK and message.
pub: publishes "<seq>" at QoS 1 every PERIOD ms; prints {"acked": seq} per PUBACK.
Usage: paho_ws.py HOST PORT CLIENT_ID TOPIC sub|pub [clean=true|false] [PERIOD_MS] [PATH]
"""
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from paho_callbacks import report, say  # noqa: E402

host, port, client_id, topic, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
clean = (sys.argv[6] if len(sys.argv) > 6 else "true") == "true"
period = int(sys.argv[7] if len(sys.argv) > 7 else "10") / 1000
path = sys.argv[8] if len(sys.argv) > 8 else "/mqtt"
state = {"seq": 0, "mids": {}, "early": set()}
# A PUBACK can be handled on the loop thread before publish() returns its mid here: such a mid
# is kept in "early" until the main thread learns whose it is. The lock is never held across a
# call into paho: paho runs on_publish holding its own message lock, which publish() takes too,
# so holding ours across publish() deadlocks both threads when a PUBACK comes meanwhile.
lock = threading.Lock()


def on_publish(client, userdata, mid, reason_code, properties):
    with lock:
        seq = state["mids"].pop(mid, None)
        if seq is None:
            state["early"].add(mid)
    if seq is not None:
        say(acked=seq)


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, transport="websockets")
c.ws_set_options(path=path)
report(c, topic if mode == "sub" else None)
c.on_publish = on_publish
c.reconnect_delay_set(min_delay=1, max_delay=1)
c.connect(host, port, keepalive=5)
if mode == "pub":
    c.loop_start()
    while True:
        time.sleep(period)
        if c.is_connected():
            state["seq"] += 1
            seq = state["seq"]
            info = c.publish(topic, str(seq), qos=1)
            with lock:
                early = info.mid in state["early"]
                if early:
                    state["early"].discard(info.mid)
                else:
                    state["mids"][info.mid] = seq
            if early:
                say(acked=seq)
else:
    c.loop_forever(retry_first_connection=True)
