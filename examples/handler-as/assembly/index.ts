// Example Outpost handler in AssemblyScript: the same handlers as the Go
// example (examples/handler-go), passing the same test through the agent.
import {
  command, error, json, jsonNumber, jsonNumberField, log, method, onInit,
  Request, Response,
} from "../../../abi/guest-as/assembly";

export { outpost_abi_v1, outpost_handle, outpost_idle, outpost_init } from "../../../abi/guest-as/assembly";

let served = 0;
let minValue: f64 = 0;
let maxValue: f64 = 100;

// The plugin's config (the manifest's config section) arrives here.
onInit((config: Uint8Array): bool => {
  if (config.length == 0) return true;
  const s = String.UTF8.decodeUnsafe(config.dataStart, config.length);
  const lo = jsonNumberField(s, "min");
  const hi = jsonNumberField(s, "max");
  if (!isNaN(lo)) minValue = lo;
  if (!isNaN(hi)) maxValue = hi;
  return true;
});

method("getDiagnostics", (r: Request): Response => {
  served++;
  return json(200, '{"requests_served":' + served.toString() +
    ',"setpoint_limits":{"min":' + jsonNumber(minValue) + ',"max":' + jsonNumber(maxValue) + "}}");
});

method("echo", (r: Request): Response => {
  served++;
  return new Response(200, r.payload(), r.contentType, r.props);
});

command("setpoint", (r: Request): Response => {
  served++;
  const v = jsonNumberField(r.payloadString(), "value");
  if (isNaN(v)) return error(400, 'want {"value": NUMBER}');
  if (v < minValue || v > maxValue) {
    return error(422, jsonNumber(v) + " is outside " + jsonNumber(minValue) + ".." + jsonNumber(maxValue));
  }
  log(2, "set point accepted: " + jsonNumber(v));
  return json(200, '{"accepted":' + jsonNumber(v) + "}");
});
