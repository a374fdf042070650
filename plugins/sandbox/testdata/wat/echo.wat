;; A well-behaved handler in plain wasm: answers 200 with the request's
;; payload (up to 4 KiB) and content type "application/octet-stream".
(module
  (import "outpost_v1" "req_payload" (func $req_payload (param i32 i32 i32) (result i32)))
  (import "outpost_v1" "resp_write" (func $resp_write (param i32 i32) (result i32)))
  (import "outpost_v1" "resp_set_content_type" (func $resp_ct (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "application/octet-stream")
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param $meta i32) (param $payload i32) (result i32)
    (local $n i32)
    (drop (call $resp_ct (i32.const 0) (i32.const 24)))
    (local.set $n (call $req_payload (i32.const 1024) (i32.const 4096) (i32.const 0)))
    (drop (call $resp_write (i32.const 1024) (local.get $n)))
    (i32.const 200)))
