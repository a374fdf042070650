// A test module for the AssemblyScript SDK: "decode" decodes the metadata
// envelope in its payload and answers with its fields as JSON (or 400 and
// the decoder's error), for the golden vectors of abi/testdata.
import { decodeError, decodeMeta, error, json, jsonString, method, Request, Response } from "../../assembly";

export { outpost_abi_v1, outpost_handle } from "../../assembly";

method("decode", (r: Request): Response => {
  const m = decodeMeta(r.payload());
  if (m == null) return error(400, decodeError);
  let props = "[";
  for (let i = 0; i < m.props.length; i++) {
    if (i > 0) props += ",";
    props += "[" + jsonString(m.props[i].key) + "," + jsonString(m.props[i].value) + "]";
  }
  props += "]";
  return json(200, '{"kind":' + m.kind.toString() + ',"flags":' + m.flags.toString() +
    ',"deadline_ms":' + m.deadlineMs.toString() + ',"name":' + jsonString(m.name) +
    ',"request_id":' + jsonString(String.UTF8.decodeUnsafe(m.requestId.dataStart, m.requestId.length)) + ',"content_type":' + jsonString(m.contentType) +
    ',"props":' + props + "}");
});

// A response kept across requests: "shared" answers it with one property
// added, which must not pile up from one request to the next.
const SHARED = new Response(200);

method("shared", (r: Request): Response => SHARED.with("n", "1"));

// "rid" answers the request's id, as bytes.
method("rid", (r: Request): Response => new Response(200, r.requestId));
