// Outpost handler SDK for AssemblyScript (ABI v1, abi/ABI.md).
//
// A handler module registers its handlers at the top level of its entry
// file and re-exports the ABI's entry points:
//
//   import { method, Request, Response, text } from "../../../abi/guest-as/assembly";
//   export { outpost_abi_v1, outpost_handle, outpost_idle, outpost_init } from "../../../abi/guest-as/assembly";
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

/** An empty array, shared: nothing can be written into it. */
const EMPTY = new Uint8Array(0);

export class Property {
  constructor(public key: string, public value: string) {}
}

export class Request {
  kind: u8 = 0;
  flags: u16 = 0;
  /** Milliseconds left to answer; 0 = none given. */
  deadlineMs: u32 = 0;
  name: string = "";
  /**
   * The request's id on its transport (correlation data, a $rid), opaque
   * bytes: MQTT correlation data need not be text.
   */
  requestId: Uint8Array = EMPTY;
  contentType: string = "";
  payloadLen: u32 = 0;
  private body: Uint8Array | null = null;
  // Made on first use: most requests have no properties, and every
  // allocation costs a request time in the guest's collector.
  private _props: Array<Property> | null = null;

  /** The request's properties, in order. */
  get props(): Array<Property> {
    let p = this._props;
    if (p == null) {
      p = new Array<Property>();
      this._props = p;
    }
    return p;
  }

  /** The value of the first property named key, or "". */
  prop(key: string): string {
    const p = this._props;
    if (p == null) return "";
    for (let i = 0; i < p.length; i++) {
      if (p[i].key == key) return p[i].value;
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

/** Decodes a metadata envelope (abi/ABI.md section 4), or returns null and sets decodeError. */
export function decodeMeta(b: Uint8Array): Request | null {
  const r = new Request();
  return decodeAt(r, b.dataStart, b.length, false) ? r : null;
}

/** A copy of [ptr, ptr+n); the shared empty array when n is 0. */
function bytes(ptr: usize, n: i32): Uint8Array {
  if (n == 0) return EMPTY;
  const b = new Uint8Array(n);
  memory.copy(b.dataStart, ptr, n);
  return b;
}

/** UTF-8 bytes [ptr, ptr+n) as a string; "" without allocating when empty. */
function str(ptr: usize, n: i32): string {
  return n == 0 ? "" : String.UTF8.decodeUnsafe(ptr, n);
}

const FIELDS: StaticArray<string> = ["name", "request id", "content type"];

/** The largest envelope (abi/ABI.md section 4). */
const MAX_META_SIZE: i32 = 64 << 10;

/** The handler decodeAt found for the request when asked to match. */
let matched: Registered | null = null;

/**
 * Decodes the envelope at [p, p+len) into r, or sets decodeError and
 * returns false. With match set it looks the name up among the registered
 * handlers, as bytes, and sets matched: a request for a registered name
 * takes the registered string and decodes no name.
 */
function decodeAt(r: Request, p: usize, len: i32, match: bool): bool {
  if (len > MAX_META_SIZE) {
    decodeError = "over the size limit: " + len.toString() + " bytes, at most " + MAX_META_SIZE.toString();
    return false;
  }
  if (len < 8) {
    decodeError = "truncated";
    return false;
  }
  if (load<u8>(p) == 0) {
    decodeError = "version 0";
    return false;
  }
  r.kind = load<u8>(p, 1);
  r.flags = load<u16>(p, 2);
  r.deadlineMs = load<u32>(p, 4);
  let off = 8;
  for (let i = 0; i < 3; i++) {
    if (off + 2 > len) {
      decodeError = "truncated: in the " + FIELDS[i];
      return false;
    }
    const n = <i32>load<u16>(p + off);
    off += 2;
    if (off + n > len) {
      decodeError = "truncated: in the " + FIELDS[i];
      return false;
    }
    if (i == 0) {
      const h = match ? find(r.kind, p + off, n) : null;
      matched = h;
      r.name = h != null ? h.name : str(p + off, n);
    } else if (i == 1) r.requestId = bytes(p + off, n);
    else r.contentType = str(p + off, n);
    off += n;
  }
  if (off + 2 > len) {
    decodeError = "truncated: in the property count";
    return false;
  }
  const count = <i32>load<u16>(p + off);
  off += 2;
  if (count > (len - off) / 4) {
    decodeError = "truncated: " + count.toString() + " properties";
    return false;
  }
  for (let i = 0; i < count; i++) {
    let k = "";
    for (let j = 0; j < 2; j++) {
      if (off + 2 > len) {
        decodeError = "truncated: in property " + i.toString();
        return false;
      }
      const n = <i32>load<u16>(p + off);
      off += 2;
      if (off + n > len) {
        decodeError = "truncated: in property " + i.toString();
        return false;
      }
      if (j == 0) k = str(p + off, n);
      else r.props.push(new Property(k, str(p + off, n)));
      off += n;
    }
  }
  return true;
}

// ---- the response ----

export class Response {
  private _props: Array<Property> | null;

  constructor(
    public status: i32,
    public body: Uint8Array = EMPTY,
    public contentType: string = "",
    props: Array<Property> | null = null,
  ) {
    this._props = props;
  }

  /** The response's properties, in order. */
  get props(): Array<Property> {
    let p = this._props;
    if (p == null) {
      p = new Array<Property>();
      this._props = p;
    }
    return p;
  }

  /**
   * A copy of the response with a property added, as the Go SDK's With: a
   * response kept and reused across requests does not collect properties.
   */
  with(key: string, value: string): Response {
    const p = this._props;
    const props = p == null ? new Array<Property>() : p.slice(0);
    props.push(new Property(key, value));
    return new Response(this.status, this.body, this.contentType, props);
  }

  /** Whether the response has properties, without making the array. */
  hasProps(): bool {
    const p = this._props;
    return p != null && p.length > 0;
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

class Registered {
  constructor(public kind: u8, public name: string, public bytes: ArrayBuffer, public h: Handler) {}
}

// The registered handlers. A module has a handful: a scan comparing bytes
// costs a request less than decoding the name and hashing it.
const registered = new Array<Registered>();

/** Whether [a, a+n) and [b, b+n) hold the same bytes: a word at a time. */
function bytesEqual(a: usize, b: usize, n: i32): bool {
  while (n >= 8) {
    if (load<u64>(a) != load<u64>(b)) return false;
    a += 8;
    b += 8;
    n -= 8;
  }
  if (n >= 4) {
    if (load<u32>(a) != load<u32>(b)) return false;
    a += 4;
    b += 4;
    n -= 4;
  }
  if (n >= 2) {
    if (load<u16>(a) != load<u16>(b)) return false;
    a += 2;
    b += 2;
    n -= 2;
  }
  return n == 0 || load<u8>(a) == load<u8>(b);
}

/** The handler for kind and the UTF-8 name at [p, p+n), or null. */
function find(kind: u8, p: usize, n: i32): Registered | null {
  for (let i = 0; i < registered.length; i++) {
    const r = unchecked(registered[i]);
    if (r.kind == kind && r.bytes.byteLength == n && bytesEqual(changetype<usize>(r.bytes), p, n)) return r;
  }
  return null;
}

function register(kind: u8, name: string, h: Handler): void {
  const b = String.UTF8.encode(name);
  if (find(kind, changetype<usize>(b), b.byteLength) != null) {
    // Without an abort import the throw is a bare trap: say why first.
    log(4, kindName(kind) + ' "' + name + '" registered twice');
    throw new Error("registered twice: " + name);
  }
  registered.push(new Registered(kind, name, b, h));
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

// The last content type sent and its UTF-8 bytes: handlers send the same
// one again and again.
let lastCT = "";
let lastCTBytes = new ArrayBuffer(0);

function send(r: Response): i32 {
  if (r.contentType.length > 0) {
    if (r.contentType != lastCT) {
      lastCTBytes = String.UTF8.encode(r.contentType);
      lastCT = r.contentType;
    }
    resp_set_content_type(changetype<usize>(lastCTBytes), lastCTBytes.byteLength);
  }
  if (r.hasProps()) {
    const props = r.props;
    for (let i = 0; i < props.length; i++) {
      const k = utf8(props[i].key);
      const v = utf8(props[i].value);
      if (resp_set_prop(k.dataStart, k.length, v.dataStart, v.length) < 0) break;
    }
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
  const req = new Request();
  if (!decodeAt(req, metaBuf.dataStart, n, true)) return send(error(400, "bad request metadata: " + decodeError));
  req.payloadLen = payloadLen;
  const h = matched;
  if (h == null) {
    return send(error(501, "no handler for " + kindName(req.kind) + ' "' + req.name + '"'));
  }
  return send(h.h(req));
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
 * such an object or the key is missing or not a number. It searches the
 * text, it does not parse it: a nested object, or a string value that holds
 * `"key"`, can mislead it. Use a JSON library for untrusted input where that
 * matters.
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
