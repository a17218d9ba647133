import { api } from "../api.js";
import { copyBlock, h } from "../dom.js";

// Ready-to-copy connection forms; the token itself is never readable again, only rotated.
export async function connectSection(device) {
  let ep = null;
  try {
    ep = await api("GET", "/api/endpoints");
  } catch {
    ep = null;
  }
  const host = location.hostname;
  const token = "<TOKEN>";
  const payload = '{"temperature": 21.5}';
  const parts = [h("h2", { id: "connect-h" }, "How to connect"),
    h("p", {}, "Device id ", h("code", {}, device.id), ". Replace ", h("code", {}, token),
      " by the device's access token (shown once at creation; rotate it on the devices page to get a new one).")];
  parts.push(h("h3", {}, "HTTP"), copyBlock(`curl -X POST -H 'Content-Type: application/json' -d '${payload}' ${location.origin}/api/v1/${token}/telemetry`, "HTTP command"));
  const mqttHost = ep && ep.mqtt_external ? ep.mqtt_external.split(":")[0] : host;
  const mqttPort = ep ? (ep.mqtt_external ? ep.mqtt_external.split(":")[1] : ep.mqtt_port) : 1883;
  if (!ep || mqttPort) {
    parts.push(h("h3", {}, "MQTT"),
      h("p", {}, "Username = device id, password = token (or ThingsBoard's way: username = token). Commands arrive on ",
        h("code", {}, `devices/${device.id}/commands/+`), "."),
      copyBlock(`mosquitto_pub -h ${mqttHost} -p ${mqttPort} -u ${device.id} -P '${token}' -t devices/${device.id}/telemetry -q 1 -m '${payload}'`, "MQTT command"));
    if (ep && ep.mqtts_port) parts.push(copyBlock(`mosquitto_pub -h ${host} -p ${ep.mqtts_port} --cafile ca.pem -u ${device.id} -P '${token}' -t devices/${device.id}/telemetry -q 1 -m '${payload}'`, "MQTTS command"));
  }
  else parts.push(h("p", { class: "muted" }, "MQTT is off on this platform."));
  if (!ep || ep.coap_port) {
    parts.push(h("h3", {}, "CoAP"), copyBlock(`coap-client -m post -t application/json -e '${payload}' coap://${host}:${ep ? ep.coap_port : 5683}/api/v1/${token}/telemetry`, "CoAP command"));
  } else {
    parts.push(h("p", { class: "muted" }, "CoAP is off on this platform."));
  }
  if (ep && ep.amqp) {
    parts.push(h("h3", {}, "AMQP (RabbitMQ)"),
      h("p", {}, `Broker ${ep.amqp}: publish to the exchange `, h("code", {}, "iiot"), " with routing key ", h("code", {}, `telemetry.${device.id}`),
        " and the header ", h("code", {}, "token"), "."),
      copyBlock(`import pika\nconn = pika.BlockingConnection(pika.URLParameters("amqp://USER:PASSWORD@${ep.amqp}"))\nconn.channel().basic_publish("iiot", "telemetry.${device.id}", b'${payload}',\n    pika.BasicProperties(headers={"token": "${token}"}, delivery_mode=2))`, "AMQP example"));
  } else if (ep) {
    parts.push(h("p", { class: "muted" }, "AMQP ingestion is off on this platform (IIOT_AMQP_URL unset)."));
  }
  return h("section", { class: "panel", "aria-labelledby": "connect-h" }, parts);
}
