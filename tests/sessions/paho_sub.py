"""A paho-mqtt subscriber with a persistent session, as an application would write it.

It subscribes once, on its first connection, and never again: after a reconnect it relies on
the session (session present = 1). Prints one JSON line per CONNACK, SUBACK and message.
Usage: paho_sub.py HOST PORT CLIENT_ID TOPIC_FILTER [5]   (5: MQTT 5, session expiry 1 h)
"""
import json
import sys

import paho.mqtt.client as mqtt

host, port, client_id, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
v5 = len(sys.argv) > 5 and sys.argv[5] == "5"
state = {"subscribed": False}


def say(**kv):
    print(json.dumps(kv), flush=True)


def on_connect(client, userdata, flags, reason_code, properties):
    say(connack=reason_code.value, session_present=bool(flags.session_present))
    if not state["subscribed"]:
        client.subscribe(topic, qos=1)
        state["subscribed"] = True


def on_subscribe(client, userdata, mid, reason_codes, properties):
    say(suback=[rc.value for rc in reason_codes])


def on_message(client, userdata, msg):
    say(msg=msg.payload.decode())


if v5:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    connect_args = {"clean_start": False, "properties": props}
else:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    connect_args = {}
c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
c.reconnect_delay_set(min_delay=1, max_delay=2)
c.connect(host, port, keepalive=5, **connect_args)
c.loop_forever(retry_first_connection=True)
