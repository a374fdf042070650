;; Asks the host to copy the request payload past the end of its memory.
(module
  (import "outpost_v1" "req_payload" (func $req_payload (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (drop (call $req_payload (i32.const 70000) (i32.const 100) (i32.const 0)))
    (i32.const 200)))
