// An MQTT.js client over WebSockets, as a browser or Node application writes one.
//
// sub: subscribes once (QoS 1) on its first connection and never again, so after a reconnect
//      it relies on its session; prints one JSON line per CONNACK, SUBACK and message.
// pub: publishes "<seq>" at QoS 1 every PERIOD ms; prints {"acked": seq} per PUBACK.
// Usage: node mqttjs_client.js URL CLIENT_ID TOPIC sub|pub [clean=true|false] [PERIOD_MS]
// With MQTT_CA set (a PEM file), a wss:// URL is verified against that CA only.
const fs = require("fs");
const mqtt = require("mqtt");

const [url, clientId, topic, mode, clean = "true", period = "10"] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const c = mqtt.connect(url, {
  clientId,
  clean: clean === "true",
  protocolVersion: 4,
  keepalive: 5,
  reconnectPeriod: 200,
  connectTimeout: 5000,
  ...(process.env.MQTT_CA ? { ca: fs.readFileSync(process.env.MQTT_CA), rejectUnauthorized: true } : {}),
});
let subscribed = false;
let seq = 0;
c.on("connect", (ack) => {
  say({ connack: ack.returnCode || 0, session_present: !!ack.sessionPresent });
  if (mode === "sub" && !subscribed) {
    subscribed = true;
    c.subscribe(topic, { qos: 1 }, (err, granted) => {
      if (err) say({ error: String(err) });
      else say({ suback: granted.map((g) => g.qos) });
    });
  }
});
c.on("message", (_t, payload) => say({ msg: payload.toString() }));
c.on("error", (e) => say({ error: e.message }));
if (mode === "pub") {
  setInterval(() => {
    if (!c.connected) return;
    const n = ++seq;
    c.publish(topic, String(n), { qos: 1 }, (err) => {
      if (!err) say({ acked: n });
    });
  }, Number(period));
}
