"""A paho-mqtt subscriber with a persistent session, as an application would write it.

It subscribes once, on its first connection, and never again: after a reconnect it relies on
the session (session present = 1). Prints one JSON line per CONNACK, SUBACK and message.
Usage: paho_sub.py HOST PORT CLIENT_ID TOPIC_FILTER [5]   (5: MQTT 5, session expiry 1 h)
"""
import os
import sys

import paho.mqtt.client as mqtt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from paho_callbacks import report  # noqa: E402

host, port, client_id, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
v5 = len(sys.argv) > 5 and sys.argv[5] == "5"

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
report(c, topic)
c.reconnect_delay_set(min_delay=1, max_delay=2)
c.connect(host, port, keepalive=5, **connect_args)
c.loop_forever(retry_first_connection=True)
