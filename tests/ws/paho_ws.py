"""A paho-mqtt client over WebSockets (transport="websockets", path /mqtt).

sub: subscribes once (QoS 1) on its first connection and never again; prints one JSON line per
     CONNACK, SUBACK and message.
pub: publishes "<seq>" at QoS 1 every PERIOD ms; prints {"acked": seq} per PUBACK.
Usage: paho_ws.py HOST PORT CLIENT_ID TOPIC sub|pub [clean=true|false] [PERIOD_MS] [PATH]
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, client_id, topic, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
clean = (sys.argv[6] if len(sys.argv) > 6 else "true") == "true"
period = int(sys.argv[7] if len(sys.argv) > 7 else "10") / 1000
path = sys.argv[8] if len(sys.argv) > 8 else "/mqtt"
state = {"subscribed": False, "seq": 0, "mids": {}}
# A PUBACK can be handled on the loop thread before publish() returns its mid here.
lock = threading.Lock()


def say(**kv):
    print(json.dumps(kv), flush=True)


def on_connect(client, userdata, flags, reason_code, properties):
    say(connack=reason_code.value, session_present=bool(flags.session_present))
    if mode == "sub" and not state["subscribed"]:
        client.subscribe(topic, qos=1)
        state["subscribed"] = True


def on_subscribe(client, userdata, mid, reason_codes, properties):
    say(suback=[rc.value for rc in reason_codes])


def on_message(client, userdata, msg):
    say(msg=msg.payload.decode())


def on_publish(client, userdata, mid, reason_code, properties):
    with lock:
        seq = state["mids"].pop(mid, None)
    if seq is not None:
        say(acked=seq)


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, transport="websockets")
c.ws_set_options(path=path)
c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
c.on_publish = on_publish
c.reconnect_delay_set(min_delay=1, max_delay=1)
c.connect(host, port, keepalive=5)
if mode == "pub":
    c.loop_start()
    while True:
        time.sleep(period)
        if c.is_connected():
            with lock:
                state["seq"] += 1
                info = c.publish(topic, str(state["seq"]), qos=1)
                state["mids"][info.mid] = state["seq"]
else:
    c.loop_forever(retry_first_connection=True)
