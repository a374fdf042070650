// Outpost handler SDK for AssemblyScript (ABI v1, abi/ABI.md).
//
// A handler module registers its handlers at the top level of its entry
// file and re-exports the ABI's entry points:
//
//   import { method, Request, Response, text } from "../../../abi/guest-as/assembly";
//   export { outpost_abi_v1, outpost_handle, outpost_init } from "../../../abi/guest-as/assembly";
//   method("hello", (r: Request): Response => text(200, "hello " + r.payloadString()));
//
// Build it as a reactor without an abort import (asconfig.json):
//   asc index.ts --runtime incremental --exportStart _initialize --use abort= -O3

// ---- imports: outpost_v1 ----

@external("outpost_v1", "req_meta")
declare function req_meta(buf: usize, limit: u32): i32;
@external("outpost_v1", "req_payload")
declare function req_payload(buf: usize, limit: u32, offset: u32): i32;
@external("outpost_v1", "resp_write")
declare function resp_write(ptr: usize, len: u32): i32;
@external("outpost_v1", "resp_set_prop")
declare function resp_set_prop(kp: usize, kl: u32, vp: usize, vl: u32): i32;
@external("outpost_v1", "resp_set_content_type")
declare function resp_set_content_type(ptr: usize, len: u32): i32;
@external("outpost_v1", "cfg_read")
declare function cfg_read(buf: usize, limit: u32): i32;
@external("outpost_v1", "log")
declare function host_log(level: u32, ptr: usize, len: u32): void;

// ---- the request ----

export const KIND_COMMAND: u8 = 1;
export const KIND_METHOD: u8 = 2;
export const KIND_DM_ACTION: u8 = 3;

export const FLAG_RESPONSE_EXPECTED: u16 = 1;
export const FLAG_REDELIVERY: u16 = 2;

export class Property {
  constructor(public key: string, public value: string) {}
}

export class Request {
  kind: u8 = 0;
  flags: u16 = 0;
  /** Milliseconds left to answer; 0 = none given. */
  deadlineMs: u32 = 0;
  name: string = "";
  requestId: string = "";
  contentType: string = "";
  props: Array<Property> = new Array<Property>();
  payloadLen: u32 = 0;
  private body: Uint8Array | null = null;

  /** The value of the first property named key, or "". */
  prop(key: string): string {
    for (let i = 0; i < this.props.length; i++) {
      if (this.props[i].key == key) return this.props[i].value;
    }
    return "";
  }

  /** The whole payload, read from the host the first time. */
  payload(): Uint8Array {
    let b = this.body;
    if (b == null) {
      b = new Uint8Array(this.payloadLen);
      if (this.payloadLen > 0) {
        const n = req_payload(b.dataStart, this.payloadLen, 0);
        if (n < 0 || <u32>n < this.payloadLen) b = b.subarray(0, max(n, 0));
      }
      this.body = b;
    }
    return b;
  }

  /** Reads up to buf.length payload bytes from offset; 0 at the end. */
  read(buf: Uint8Array, offset: u32): i32 {
    return req_payload(buf.dataStart, buf.length, offset);
  }

  payloadString(): string {
    const p = this.payload();
    return String.UTF8.decodeUnsafe(p.dataStart, p.length);
  }
}

/** Why the last decodeMeta returned null. */
export let decodeError: string = "";

function readU16(b: Uint8Array, off: i32): i32 {
  return <i32>b[off] | (<i32>b[off + 1] << 8);
}

/** Decodes a metadata envelope (abi/ABI.md section 4), or returns null and sets decodeError. */
export function decodeMeta(b: Uint8Array): Request | null {
  if (b.length < 8) {
    decodeError = "truncated";
    return null;
  }
  if (b[0] == 0) {
    decodeError = "version 0";
    return null;
  }
  const r = new Request();
  r.kind = b[1];
  r.flags = <u16>readU16(b, 2);
  r.deadlineMs = <u32>b[4] | (<u32>b[5] << 8) | (<u32>b[6] << 16) | (<u32>b[7] << 24);
  let off = 8;
  const fields = ["name", "request id", "content type"];
  for (let i = 0; i < 3; i++) {
    if (off + 2 > b.length) {
      decodeError = "truncated: in the " + fields[i];
      return null;
    }
    const n = readU16(b, off);
    off += 2;
    if (off + n > b.length) {
      decodeError = "truncated: in the " + fields[i];
      return null;
    }
    const s = String.UTF8.decodeUnsafe(b.dataStart + off, n);
    off += n;
    if (i == 0) r.name = s;
    else if (i == 1) r.requestId = s;
    else r.contentType = s;
  }
  if (off + 2 > b.length) {
    decodeError = "truncated: in the property count";
    return null;
  }
  const count = readU16(b, off);
  off += 2;
  if (count > (b.length - off) / 4) {
    decodeError = "truncated: " + count.toString() + " properties";
    return null;
  }
  for (let i = 0; i < count; i++) {
    let kv = new Array<string>(2);
    for (let j = 0; j < 2; j++) {
      if (off + 2 > b.length) {
        decodeError = "truncated: in property " + i.toString();
        return null;
      }
      const n = readU16(b, off);
      off += 2;
      if (off + n > b.length) {
        decodeError = "truncated: in property " + i.toString();
        return null;
      }
      kv[j] = String.UTF8.decodeUnsafe(b.dataStart + off, n);
      off += n;
    }
    r.props.push(new Property(kv[0], kv[1]));
  }
  return r;
}

// ---- the response ----

export class Response {
  constructor(
    public status: i32,
    public body: Uint8Array = new Uint8Array(0),
    public contentType: string = "",
    public props: Array<Property> = new Array<Property>(),
  ) {}

  /** Adds a property. */
  with(key: string, value: string): Response {
    this.props.push(new Property(key, value));
    return this;
  }
}

function utf8(s: string): Uint8Array {
  return Uint8Array.wrap(String.UTF8.encode(s));
}

export function status(s: i32): Response {
  return new Response(s);
}

export function text(s: i32, body: string): Response {
  return new Response(s, utf8(body), "text/plain; charset=utf-8");
}

/** A response whose body is JSON the handler wrote. */
export function json(s: i32, body: string): Response {
  return new Response(s, utf8(body), "application/json");
}

/** {"error": msg}, as the Go SDK's Error. */
export function error(s: i32, msg: string): Response {
  return json(s, '{"error":' + jsonString(msg) + "}");
}

// ---- handlers ----

type Handler = (r: Request) => Response;

// One map per kind: no key to build per request.
const commands = new Map<string, Handler>();
const methods = new Map<string, Handler>();
const dmActions = new Map<string, Handler>();

function handlersOf(kind: u8): Map<string, Handler> | null {
  if (kind == KIND_METHOD) return methods;
  if (kind == KIND_COMMAND) return commands;
  if (kind == KIND_DM_ACTION) return dmActions;
  return null;
}

function register(kind: u8, name: string, h: Handler): void {
  const m = changetype<Map<string, Handler>>(handlersOf(kind));
  if (m.has(name)) throw new Error("registered twice: " + name);
  m.set(name, h);
}

export function method(name: string, h: Handler): void {
  register(KIND_METHOD, name, h);
}

export function command(name: string, h: Handler): void {
  register(KIND_COMMAND, name, h);
}

export function dmAction(name: string, h: Handler): void {
  register(KIND_DM_ACTION, name, h);
}

let initFn: ((config: Uint8Array) => bool) | null = null;

/** Registers fn to run once per instance with the plugin's config; false rejects the instance. */
export function onInit(fn: (config: Uint8Array) => bool): void {
  initFn = fn;
}

/** Logs msg at level (0 trace .. 4 error). */
export function log(level: u32, msg: string): void {
  const b = utf8(msg);
  host_log(level, b.dataStart, b.length);
}

function kindName(k: u8): string {
  if (k == KIND_COMMAND) return "command";
  if (k == KIND_METHOD) return "method";
  if (k == KIND_DM_ACTION) return "dm_action";
  return "kind(" + k.toString() + ")";
}

function send(r: Response): i32 {
  if (r.contentType.length > 0) {
    const ct = utf8(r.contentType);
    resp_set_content_type(ct.dataStart, ct.length);
  }
  for (let i = 0; i < r.props.length; i++) {
    const k = utf8(r.props[i].key);
    const v = utf8(r.props[i].value);
    if (resp_set_prop(k.dataStart, k.length, v.dataStart, v.length) < 0) break;
  }
  if (r.body.length > 0) resp_write(r.body.dataStart, r.body.length);
  return r.status;
}

let metaBuf = new Uint8Array(512);

// ---- exports: re-export these from the module's entry file ----

export function outpost_abi_v1(): void {}

export function outpost_handle(metaLen: u32, payloadLen: u32): i32 {
  if (metaLen > <u32>metaBuf.length) metaBuf = new Uint8Array(metaLen);
  const n = req_meta(metaBuf.dataStart, metaBuf.length);
  if (n < 0 || n > metaBuf.length) return 500;
  const r = decodeMeta(metaBuf.subarray(0, n));
  if (r == null) return send(error(400, "bad request metadata: " + decodeError));
  const req = changetype<Request>(r);
  req.payloadLen = payloadLen;
  const m = handlersOf(req.kind);
  if (m == null || !m.has(req.name)) {
    return send(error(501, "no handler for " + kindName(req.kind) + ' "' + req.name + '"'));
  }
  return send(m.get(req.name)(req));
}

/** Between requests (called by the host when due): collect garbage. */
export function outpost_idle(): void {
  __collect();
}

export function outpost_init(cfgLen: u32): i32 {
  const fn = initFn;
  if (fn == null) return 0;
  const cfg = new Uint8Array(cfgLen);
  if (cfgLen > 0 && cfg_read(cfg.dataStart, cfgLen) != <i32>cfgLen) return 1;
  return fn(cfg) ? 0 : 1;
}

// ---- small JSON helpers (the standard library has no JSON) ----

/** s as a JSON string literal. */
export function jsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c == 34) out += '\\"';
    else if (c == 92) out += "\\\\";
    else if (c == 10) out += "\\n";
    else if (c == 13) out += "\\r";
    else if (c == 9) out += "\\t";
    else if (c < 32) out += "\\u00" + (c < 16 ? "0" : "") + c.toString(16);
    else out += String.fromCharCode(c);
  }
  return out + '"';
}

/** v as Go's encoding/json writes it: integers without a fraction. */
export function jsonNumber(v: f64): string {
  if (Math.floor(v) == v && Math.abs(v) < 1e15) return (<i64>v).toString();
  return v.toString();
}

/**
 * The number under key in a flat JSON object, or NaN when the text is not
 * such an object or the key is missing or not a number.
 */
export function jsonNumberField(s: string, key: string): f64 {
  const t = s.trim();
  if (!t.startsWith("{") || !t.endsWith("}")) return NaN;
  const i = t.indexOf(jsonString(key));
  if (i < 0) return NaN;
  let j = i + key.length + 2;
  while (j < t.length && (t.charAt(j) == " " || t.charAt(j) == "\t" || t.charAt(j) == "\n")) j++;
  if (j >= t.length || t.charAt(j) != ":") return NaN;
  j++;
  let k = j;
  while (k < t.length && t.charAt(k) != "," && t.charAt(k) != "}") k++;
  const num = t.substring(j, k).trim();
  if (num.length == 0) return NaN;
  for (let m = 0; m < num.length; m++) {
    const c = num.charCodeAt(m);
    if (!((c >= 48 && c <= 57) || c == 45 || c == 43 || c == 46 || c == 101 || c == 69)) return NaN;
  }
  return parseFloat(num);
}
