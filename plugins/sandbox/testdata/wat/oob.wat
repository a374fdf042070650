;; Hands the host a buffer past the end of its memory.
(module
  (import "outpost_v1" "resp_write" (func $resp_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (drop (call $resp_write (i32.const 65000) (i32.const 1000)))
    (i32.const 200)))
