"""What the paho-mqtt test scripts share: one JSON line per event, and a subscriber that subscribes once.

A subscriber subscribes (QoS 1) on its first CONNACK and never again: after a reconnect it relies
on its session (session present = 1). Lines: {"connack", "session_present", ...extra}, {"suback"},
{"msg"}.
"""
import json


def say(**kv):
    print(json.dumps(kv), flush=True)


def report(client, topic=None, extra=dict):
    """Prints every CONNACK, SUBACK and message of `client`; with `topic`, subscribes to it once.
    `extra()` adds fields to each CONNACK line."""
    state = {"subscribed": False}

    def on_connect(client, userdata, flags, reason_code, properties):
        say(connack=reason_code.value, session_present=bool(flags.session_present), **extra())
        if topic is not None and not state["subscribed"]:
            client.subscribe(topic, qos=1)
            state["subscribed"] = True

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        say(suback=[rc.value for rc in reason_codes])

    def on_message(client, userdata, msg):
        say(msg=msg.payload.decode())

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
